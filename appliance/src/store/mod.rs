//! Durable state: machines, their event history, tokens, SSH keys and boot resources.
//!
//! Two backends behind the same methods (see [`sql`]: every query is written once):
//! - **SQLite** (bundled), the default of one appliance, in WAL mode with
//!   `synchronous = FULL`: a change is acknowledged only after its transaction is on disk, so
//!   nothing acknowledged is lost to `kill -9` or power loss.
//! - **PostgreSQL** (`--database postgres://...`), shared by several appliances: a pool of
//!   connections, each transaction committed (and so durable) before the change is
//!   acknowledged; a connection PostgreSQL closed is replaced at the next call.
//!
//! Schema changes are numbered SQL files run by refinery (see `store::migrate`):
//! `appliance/migrations/` for SQLite, `appliance/migrations-postgres/` for PostgreSQL.
//!
//! The methods take `&self` and are synchronous; callers in async code run them on the
//! blocking pool (`Store::call`), so no transaction is ever held across an `.await`.
//!
//! BMC passwords are stored encrypted under a key file kept apart from the database
//! ([`secrets`]); the rows a reader gets back hold them in clear again.

mod copy;
mod duty;
mod migrate;
pub mod model;
mod power_requests;
pub mod secrets;
pub mod sql;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use stork_proto::MacAddr;
use stork_proto::api::{
    AgentIdentity, AuditRecord, HardwareSummary, MachineFilter, MachineSummary, PowerState,
    SORT_KEYS, TokenScope, is_secret_param,
};

pub use copy::CopyReport;
pub use duty::{Duty, named_lock};
pub use model::*;
pub use power_requests::PowerRequest;
pub use secrets::{KEY_ENV, SecretKey, SecretsError};
pub use sql::DbError;
use sql::{Dialect, Lite, PgManager, Row, Sql, Value, args};

use crate::lifecycle::Status;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Db(#[from] DbError),
    #[error("stored JSON in {column} is invalid")]
    Json {
        column: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("no machine {0:?}")]
    NotFound(String),
    #[error("machine {id} changed since it was read (version {expected})")]
    Conflict { id: String, expected: i64 },
    #[error("MAC address {0} belongs to another machine")]
    MacTaken(MacAddr),
    #[error("address {ip} is machine {machine}'s (its deploy's network config)")]
    AddressTaken { ip: IpAddr, machine: String },
    #[error("database task failed")]
    Join(#[from] tokio::task::JoinError),
    #[error("schema migration failed")]
    Migrate(#[from] migrate::MigrateError),
    #[error(
        "the appliance's disk is nearly full: {free_mib} MiB free under {dir}, below the \
         {need_mib} MiB it keeps for status changes and DHCP leases; free some space"
    )]
    DiskFull {
        dir: std::path::PathBuf,
        free_mib: u64,
        need_mib: u64,
    },
    #[error("cannot make {path} private to its owner")]
    Restrict {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error("database: {0}")]
    Url(String),
    #[error(
        "the target database is not empty ({machines} machines, {tokens} tokens): a copy \
         goes into a new, empty database only"
    )]
    NotEmpty { machines: i64, tokens: i64 },
    #[error("cannot reach PostgreSQL ({target})")]
    Unreachable {
        target: String,
        #[source]
        source: DbError,
    },
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Db(e.into())
    }
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        StoreError::Db(e.into())
    }
}

/// Where the store is: `sqlite:PATH` (or a bare path), or a `postgres://` URL.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    Sqlite(PathBuf),
    Postgres(String),
}

/// The URL may hold a password: only where the database is gets printed.
impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            Database::Postgres(url) => match url.parse::<postgres::Config>() {
                Ok(c) => write!(f, "postgres: {}", sql::describe(&c)),
                Err(_) => f.write_str("postgres: (unreadable URL)"),
            },
        }
    }
}

impl std::fmt::Display for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

impl Database {
    /// The secrets key file: [`KEY_ENV`] if set, else `secrets.key` beside a SQLite
    /// database, or in `data_dir` for PostgreSQL (every appliance sharing that database
    /// needs a copy of the same file).
    pub fn key_path(&self, data_dir: &Path) -> PathBuf {
        match self {
            Database::Sqlite(path) => secrets::key_path_for(path),
            Database::Postgres(_) => secrets::key_path_for(&data_dir.join("stork.db")),
        }
    }

    /// Opens the store here, with its key file (see [`Database::key_path`]).
    pub fn open(&self, data_dir: &Path) -> Result<Store, StoreError> {
        Store::open_database(self, &self.key_path(data_dir))
    }

    /// Reads a `--database` value; the error says what is accepted.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            s.parse::<postgres::Config>()
                .map_err(|e| format!("database: not a PostgreSQL URL: {e}"))?;
            return Ok(Database::Postgres(s.to_string()));
        }
        let path = s.strip_prefix("sqlite:").unwrap_or(s);
        if path.is_empty() || s.contains("://") {
            // Only the scheme is echoed: what follows it may hold a password.
            let scheme = s.split_once("://").map_or("", |(scheme, _)| scheme);
            return Err(format!(
                "database: a {scheme:?} URL is neither sqlite:PATH nor a postgres:// URL"
            ));
        }
        Ok(Database::Sqlite(PathBuf::from(path)))
    }
}

#[derive(Clone, Debug)]
pub struct Store {
    db: Arc<Db>,
    /// Where a SQLite database lives: new records are refused when its file system runs
    /// low. `None` for PostgreSQL, whose server watches its own disk.
    dir: Option<Arc<PathBuf>>,
    /// The last free-space answer and when it was asked (see [`Store::check_space`]).
    space: Arc<Mutex<Option<SpaceAnswer>>>,
    /// Seals the BMC passwords written, opens those read.
    key: Arc<SecretKey>,
}

#[derive(Debug)]
enum Db {
    Sqlite(Mutex<Connection>),
    Postgres(r2d2::Pool<PgManager>, postgres::Config),
}

/// New machines and appended events are refused while the database's file system has less
/// than this free: what is left goes to the status changes under way and the DHCP lease
/// journal, which share the data directory.
pub const MIN_FREE_BYTES: u64 = 64 << 20;

/// When the file system was asked, and the bytes free it answered (`None`: no answer).
type SpaceAnswer = (Instant, Option<u64>);

/// How long a free-space answer is trusted: a flood of inserts asks the file system once
/// per this, not once per insert. What a second of inserts writes is far below the reserve.
const SPACE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Connections one appliance keeps to PostgreSQL at most: the blocking pool runs the
/// store's calls, and more connections than cores only queue on the server.
const PG_POOL_SIZE: u32 = 8;

/// How long a call waits for a PostgreSQL connection (opening one included) before failing.
const PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn json<T: serde::Serialize>(v: &T) -> String {
    // Serializing our own plain data types cannot fail.
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn from_json<T: serde::de::DeserializeOwned>(
    column: &'static str,
    s: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|source| StoreError::Json { column, source })
}

/// Each machine keeps its newest this many events.
pub const MAX_EVENTS_PER_MACHINE: i64 = 10_000;
/// The audit log keeps its newest this many entries (ids are given in order).
pub const MAX_AUDIT_ENTRIES: i64 = if cfg!(test) { 200 } else { 1_000_000 };
/// Retention is applied on every this many inserted events (of any machine).
const RETENTION_CHECK_EVERY: i64 = 64;

/// Makes `path` readable and writable by its owner only.
pub fn restrict(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        StoreError::Restrict {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// `SELECT <columns> FROM machines` starts with these; [`Store::machine_from_row`] reads them.
/// The power state columns are written apart from the version-checked save (see
/// `Store::set_power_state`), so they come last and are not in the insert.
const MACHINE_COLUMNS: &str = "id, hostname, status, status_message, status_since, \
    version, boot_mac, arch, power, inventory, owner, deploy, tags, agent_token, created_at, \
    updated_at, netboot, erase_quick, last_heartbeat, heartbeat_step, heartbeat_deadline, \
    agent_ip, agent_token_used, hw_cpus, hw_memory_bytes, hw_disks, hw_disk_bytes, site, \
    commission_tests, default_layout, min_kernel, signed_boot";

/// [`Store::signed_boot_macs`]' statement.
const SIGNED_BOOT_MACS: &str = "SELECT mac FROM interfaces WHERE machine_id IN (SELECT id FROM machines WHERE signed_boot = 1)";

impl Store {
    /// Opens (or creates) the database at `path`, with the secrets key file
    /// [`secrets::key_path_for`] names: `$STORK_SECRETS_KEY`, else `secrets.key` beside it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_key(path, &secrets::key_path_for(path))
    }

    /// Opens `db`; the secrets key is `key_path` (all appliances sharing a PostgreSQL
    /// database need a copy of the same key file).
    pub fn open_database(db: &Database, key_path: &Path) -> Result<Self, StoreError> {
        match db {
            Database::Sqlite(path) => Self::open_with_key(path, key_path),
            Database::Postgres(url) => Self::open_postgres(url, key_path),
        }
    }

    /// Opens the database at `path` with the secrets key in `key_path`, which is created at
    /// the first start. Clear passwords an older version stored are encrypted here, once.
    pub fn open_with_key(path: &Path, key_path: &Path) -> Result<Self, StoreError> {
        let mut conn = Connection::open(path)?;
        // The database holds token hashes and BMC passwords: the owner alone reads it. SQLite
        // makes its WAL and shared-memory files with the database's mode; ones left by an
        // older version are restricted too.
        restrict(path)?;
        for suffix in ["-wal", "-shm"] {
            let mut side = path.as_os_str().to_owned();
            side.push(suffix);
            let side = std::path::PathBuf::from(side);
            if side.exists() {
                restrict(&side)?;
            }
        }
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // SQLite's default page cache is 2 MiB; 10,000 machines with their inventories are
        // about 30 MiB, so a page of the machine list read most of its pages with `pread`
        // (a syscall and a copy each). The cache grows only as pages are read.
        conn.pragma_update(None, "cache_size", -(64 << 10))?;
        // Deleted and overwritten content is zeroed, so a password encrypted in place (or any
        // record removed) leaves no clear copy in the file's free space.
        conn.pragma_update(None, "secure_delete", "ON")?;
        // The store has some 40 statement texts; rusqlite caches 16 by default, so a busy
        // mix prepared them again and again.
        conn.set_prepared_statement_cache_capacity(128);
        migrate::migrate(&mut conn)?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        Self::finish_open(Db::Sqlite(Mutex::new(conn)), Some(dir), key_path)
    }

    /// Opens the PostgreSQL database at `url` (`postgres://user:pass@host/db`, or a unix
    /// socket directory as `host=`), migrating its schema; the error says which part failed
    /// (the URL, reaching the server, or a schema this binary does not know).
    pub fn open_postgres(url: &str, key_path: &Path) -> Result<Self, StoreError> {
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Url(format!("not a PostgreSQL URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(PG_CONNECT_TIMEOUT);
        }
        let target = sql::describe(&config);
        let unreachable = |source: DbError| StoreError::Unreachable {
            target: target.clone(),
            source,
        };
        // One connection first: its error says why the server cannot be reached (the
        // pool's says only that it timed out), and it migrates the schema.
        let mut first = config
            .connect(postgres::NoTls)
            .map_err(|e| unreachable(e.into()))?;
        migrate::migrate_postgres(&mut first)?;
        drop(first);
        let pool = r2d2::Pool::builder()
            .max_size(PG_POOL_SIZE)
            .min_idle(Some(1))
            .connection_timeout(PG_CONNECT_TIMEOUT)
            // r2d2 would log connection errors itself; the store's errors carry them.
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build(PgManager(config.clone()))
            .map_err(|e| unreachable(e.into()))?;
        tracing::info!(%target, "store on PostgreSQL");
        Self::finish_open(Db::Postgres(pool, config), None, key_path)
    }

    /// Loads (or at the first start creates) the secrets key and seals clear secrets.
    fn finish_open(db: Db, dir: Option<PathBuf>, key_path: &Path) -> Result<Self, StoreError> {
        let key = match SecretKey::load(key_path)? {
            Some(key) => key,
            None if db.run(Self::any_sealed)? => {
                return Err(SecretsError::KeyMissing {
                    path: key_path.to_path_buf(),
                }
                .into());
            }
            None => {
                let key = SecretKey::create(key_path)?;
                tracing::info!(
                    key = %key_path.display(),
                    "secrets key file created: keep a copy apart from the database"
                );
                key
            }
        };
        let store = Self {
            db: Arc::new(db),
            dir: dir.map(Arc::new),
            space: Arc::default(),
            key: Arc::new(key),
        };
        store.seal_clear_secrets()?;
        Ok(store)
    }

    /// Runs `f` on a connection, each statement committed on its own.
    fn run<T>(
        &self,
        f: impl FnOnce(&mut dyn Sql) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.db.run(f)
    }

    /// Runs `f` in one transaction: committed if it returns `Ok`, rolled back if not.
    fn transaction<T>(
        &self,
        f: impl FnOnce(&mut dyn Sql) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.db.transaction(f)
    }

    /// The stored power configs, by machine id.
    fn stored_power(db: &mut dyn Sql) -> Result<Vec<(String, PowerConfig)>, StoreError> {
        let mut out = Vec::new();
        for row in db.query("SELECT id, power FROM machines", &[])? {
            let power: String = row.get(1)?;
            out.push((row.get(0)?, from_json("power", &power)?));
        }
        Ok(out)
    }

    /// Whether any machine has a sealed secret (then the key must be there).
    fn any_sealed(db: &mut dyn Sql) -> Result<bool, StoreError> {
        Ok(Self::stored_power(db)?
            .iter()
            .any(|(_, p)| p.params.values().any(secrets::is_sealed)))
    }

    /// Checks that the key opens every sealed secret, and seals the clear ones an older
    /// version left (in one transaction, without a version bump: readers see the same
    /// machine). Then, on SQLite, checkpoints, so no clear copy is left in the write-ahead
    /// log.
    fn seal_clear_secrets(&self) -> Result<(), StoreError> {
        let key = &self.key;
        let sealed = self.transaction(|db| {
            let mut upgraded = Vec::new();
            for (id, mut power) in Self::stored_power(db)? {
                let mut changed = false;
                for (name, value) in power.params.iter_mut() {
                    if !is_secret_param(name) {
                        continue;
                    }
                    if secrets::is_sealed(value) {
                        key.open(&id, name, value)?;
                    } else {
                        *value = key.seal(&id, name, value);
                        changed = true;
                    }
                }
                if changed {
                    upgraded.push((id, json(&power)));
                }
            }
            for (id, power) in &upgraded {
                db.execute(
                    "UPDATE machines SET power = ?2 WHERE id = ?1",
                    &args![id, power],
                )?;
            }
            Ok(upgraded.len())
        })?;
        if sealed == 0 {
            return Ok(());
        }
        if let Db::Sqlite(conn) = &*self.db {
            lock(conn).query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        }
        tracing::info!(
            machines = sealed,
            key = %key.path().display(),
            "stored BMC passwords encrypted"
        );
        Ok(())
    }

    /// The power config as stored: every secret parameter sealed.
    fn power_to_db(&self, id: &str, power: &PowerConfig) -> String {
        let mut p = power.clone();
        for (name, value) in p.params.iter_mut() {
            if is_secret_param(name) {
                *value = self.key.seal(id, name, value);
            }
        }
        json(&p)
    }

    /// The power config as stored, its secrets opened.
    fn power_from_db(key: &SecretKey, id: &str, stored: &str) -> Result<PowerConfig, StoreError> {
        let mut p: PowerConfig = from_json("power", stored)?;
        for (name, value) in p.params.iter_mut() {
            if is_secret_param(name) && secrets::is_sealed(value) {
                *value = key.open(id, name, value)?;
            }
        }
        Ok(p)
    }

    /// Calls `wake` whenever an appliance sharing this database (this one included) adds
    /// events, and once after each reconnection, when some may have been missed; stops
    /// when `alive` returns false. Only PostgreSQL is shared; on SQLite this appliance is the only writer and
    /// nothing is started.
    pub fn follow_changes(
        &self,
        wake: impl Fn() + Send + 'static,
        alive: impl Fn() -> bool + Send + 'static,
    ) {
        let Db::Postgres(_, config) = &*self.db else {
            return;
        };
        let config = config.clone();
        let spawned = std::thread::Builder::new()
            .name("stork-pg-listen".into())
            .spawn(move || follow(&config, &wake, &alive));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the PostgreSQL change listener");
        }
    }

    /// This appliance's hold on the periodic duties (see [`Duty`]): always held on SQLite,
    /// an advisory lock on PostgreSQL.
    pub fn duty(&self) -> Duty {
        match &*self.db {
            Db::Sqlite(_) => Duty::always(),
            Db::Postgres(_, config) => Duty::postgres(config.clone()),
        }
    }

    /// The hold of the appliances of site `site` on its own duties (power polls): always
    /// held on SQLite, an advisory lock per site on PostgreSQL.
    pub fn site_duty(&self, site: &str) -> Duty {
        match &*self.db {
            Db::Sqlite(_) => Duty::always(),
            Db::Postgres(_, config) => Duty::postgres_site(config.clone(), site),
        }
    }

    /// The PostgreSQL connection settings, for a service that needs connections of its
    /// own (the DHCP lease writer of an HA pair); `None` on SQLite.
    pub fn postgres_config(&self) -> Option<postgres::Config> {
        match &*self.db {
            Db::Sqlite(_) => None,
            Db::Postgres(_, config) => Some(config.clone()),
        }
    }

    /// Which backend this store is on.
    pub fn dialect(&self) -> Dialect {
        match &*self.db {
            Db::Sqlite(_) => Dialect::Sqlite,
            Db::Postgres(..) => Dialect::Postgres,
        }
    }

    /// Runs `f` on the blocking pool: the async API's way in.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me)).await?
    }

    // ---- machines ----

    /// A machine's columns as written, `?1` to `?32` in [`MACHINE_COLUMNS`]'s order.
    fn machine_args(&self, m: &Machine) -> Vec<Value> {
        let hw = m.inventory.as_ref().map(HardwareSummary::of);
        args![
            &m.id,
            m.hostname.as_deref(),
            m.status.as_str(),
            m.status_message.as_deref(),
            m.status_since,
            m.version,
            m.boot_mac.map(|b| b.to_string()),
            m.arch.as_str(),
            self.power_to_db(&m.id, &m.power),
            m.inventory.as_ref().map(json),
            m.owner.as_deref(),
            m.deploy.as_ref().map(json),
            json(&m.tags),
            m.agent.token_hash.as_deref(),
            m.created_at,
            m.updated_at,
            m.netboot,
            m.erase_quick,
            m.last_heartbeat,
            m.heartbeat_step.as_deref(),
            m.heartbeat_deadline,
            m.agent.ip.map(|ip| ip.to_string()),
            m.agent.used,
            hw.map(|h| h.cpus),
            hw.map(|h| i64::try_from(h.memory_bytes).unwrap_or(i64::MAX)),
            hw.map(|h| h.disks),
            hw.map(|h| i64::try_from(h.disk_bytes).unwrap_or(i64::MAX)),
            m.site.as_deref(),
            json(&m.commission_tests),
            m.default_layout.as_deref(),
            m.min_kernel.as_deref(),
            crate::lifecycle::secure_boot::SignedBoot::machine_wants(m),
        ]
        .into()
    }

    /// A machine from its row and its interfaces' MACs (any order).
    fn machine_from_row(
        key: &SecretKey,
        row: &Row,
        mut macs: Vec<MacAddr>,
    ) -> Result<Machine, StoreError> {
        let id: String = row.get(0)?;
        let status: String = row.get(2)?;
        let boot_mac: Option<String> = row.get(6)?;
        let power: String = row.get(8)?;
        let inventory: Option<String> = row.get(9)?;
        let deploy: Option<String> = row.get(11)?;
        let tags: String = row.get(12)?;
        let boot_mac: Option<MacAddr> = boot_mac.and_then(|m| m.parse().ok());
        macs.sort_by_key(|m| Some(*m) != boot_mac);
        Ok(Machine {
            power: Self::power_from_db(key, &id, &power)?,
            id,
            hostname: row.get(1)?,
            status: Status::parse(&status).unwrap_or(Status::Broken),
            status_message: row.get(3)?,
            status_since: row.get(4)?,
            version: row.get(5)?,
            boot_mac,
            macs,
            arch: row.get(7)?,
            inventory: inventory.map(|i| from_json("inventory", &i)).transpose()?,
            owner: row.get(10)?,
            deploy: deploy.map(|d| from_json("deploy", &d)).transpose()?,
            tags: from_json("tags", &tags)?,
            agent: AgentIdentity {
                token_hash: row.get(13)?,
                ip: row
                    .get::<Option<String>>(21)?
                    .and_then(|ip| ip.parse().ok()),
                used: row.get(22)?,
            },
            created_at: row.get(14)?,
            updated_at: row.get(15)?,
            netboot: row.get(16)?,
            erase_quick: row.get(17)?,
            last_heartbeat: row.get(18)?,
            heartbeat_step: row.get(19)?,
            heartbeat_deadline: row.get(20)?,
            site: row.get(27)?,
            commission_tests: from_json("commission_tests", &row.get::<String>(28)?)?,
            default_layout: row.get(29)?,
            min_kernel: row.get(30)?,
            power_state: row
                .get::<Option<String>>(32)?
                .and_then(|p| PowerState::parse(&p)),
            power_seen_at: row.get(33)?,
        })
    }

    /// The machines `where_sql` selects, oldest first.
    fn query_machines(
        key: &SecretKey,
        db: &mut dyn Sql,
        where_sql: &str,
        args: &[Value],
    ) -> Result<Vec<Machine>, StoreError> {
        let macs = Self::macs_of(
            db,
            &format!("WHERE machine_id IN (SELECT id FROM machines {where_sql})"),
            args,
        )?;
        Self::machines_with(key, db, where_sql, args, macs)
    }

    /// The machines with these ids, in the order of `ids`. Their MACs are read by
    /// `machine_id` itself: through a subquery on `machines`, PostgreSQL joined a page's 100
    /// ids to every interface by hash (3.7 ms at 10,000 machines, against 0.2 ms).
    fn machines_by_ids(
        key: &SecretKey,
        db: &mut dyn Sql,
        ids: &[String],
    ) -> Result<Vec<Machine>, StoreError> {
        let (in_sql, args) = ids_in("id", ids);
        let macs = Self::macs_of(db, &ids_in("machine_id", ids).0, &args)?;
        let mut page = Self::machines_with(key, db, &in_sql, &args, macs)?;
        in_order_of(ids, &mut page, |m| &m.id);
        Ok(page)
    }

    /// The statement that reads the machines `where_sql` selects.
    fn machines_sql(where_sql: &str) -> String {
        format!(
            "SELECT {MACHINE_COLUMNS}, power_state, power_seen_at FROM machines {where_sql} \
             ORDER BY created_at, id"
        )
    }

    fn machines_with(
        key: &SecretKey,
        db: &mut dyn Sql,
        where_sql: &str,
        args: &[Value],
        mut macs: HashMap<String, Vec<MacAddr>>,
    ) -> Result<Vec<Machine>, StoreError> {
        let mut out = Vec::new();
        for row in db.query(&Self::machines_sql(where_sql), args)? {
            let id: String = row.get(0)?;
            let m = macs.remove(&id).unwrap_or_default();
            out.push(Self::machine_from_row(key, &row, m)?);
        }
        Ok(out)
    }

    /// The MACs of the interfaces `where_sql` selects, by machine id, in the order they
    /// were added: one query for all (one per machine made listing 10,000 machines several
    /// times slower).
    fn macs_of(
        db: &mut dyn Sql,
        where_sql: &str,
        args: &[Value],
    ) -> Result<HashMap<String, Vec<MacAddr>>, StoreError> {
        let mut macs: HashMap<String, Vec<MacAddr>> = HashMap::new();
        let sql = format!(
            "SELECT machine_id, mac FROM interfaces {where_sql} ORDER BY {}",
            db.dialect().insertion_order()
        );
        for row in db.query(&sql, args)? {
            if let Ok(mac) = row.get::<String>(1)?.parse() {
                macs.entry(row.get(0)?).or_default().push(mac);
            }
        }
        Ok(macs)
    }

    pub fn list_machines(&self) -> Result<Vec<Machine>, StoreError> {
        self.run(|db| Self::query_machines(&self.key, db, "", &[]))
    }

    /// One page of the machines `q` selects, in its order, and how many it selects in all.
    pub fn machine_page(&self, q: &MachineQuery) -> Result<(u64, Vec<Machine>), StoreError> {
        self.run(|db| {
            let (total, ids) = Self::page_ids(db, q)?;
            if ids.is_empty() {
                return Ok((total, Vec::new()));
            }
            Ok((total, Self::machines_by_ids(&self.key, db, &ids)?))
        })
    }

    /// How many machines `q` selects, and the ids of its page in order. The ids first, then
    /// their rows: sorting whole rows (inventories of a few KiB each, in overflow pages that
    /// the columns after them sit behind) made a deep page of 10,000 machines ten times
    /// slower.
    fn page_ids(db: &mut dyn Sql, q: &MachineQuery) -> Result<(u64, Vec<String>), StoreError> {
        let (where_sql, mut args, order_sql, page_args) = q.sql(db.dialect());
        let total: i64 = db
            .query_one(&format!("SELECT COUNT(*) FROM machines {where_sql}"), &args)?
            .get(0)?;
        args.extend(page_args);
        let ids = db
            .query(
                &format!("SELECT id FROM machines {where_sql} {order_sql}"),
                &args,
            )?
            .iter()
            .map(|r| r.get(0))
            .collect::<Result<Vec<String>, _>>()?;
        Ok((u64::try_from(total).unwrap_or(0), ids))
    }

    /// [`Store::machine_page`] as summaries: stored columns only (the hardware ones written
    /// from the inventory with it), never an inventory parsed or a power secret opened, so a
    /// page costs the same whatever the number of machines.
    pub fn machine_summaries(
        &self,
        q: &MachineQuery,
    ) -> Result<(u64, Vec<MachineSummary>), StoreError> {
        self.run(|db| {
            let (total, ids) = Self::page_ids(db, q)?;
            if ids.is_empty() {
                return Ok((total, Vec::new()));
            }
            let (in_sql, id_args) = ids_in("id", &ids);
            let sql = format!(
                "SELECT id, hostname, status, status_message, status_since, boot_mac, arch, \
                    {}, power_state, power_seen_at, hw_cpus, \
                    hw_memory_bytes, hw_disks, hw_disk_bytes, owner, tags, heartbeat_step, \
                    created_at, updated_at \
                 FROM machines {in_sql}",
                db.dialect().json_text("power", "driver")
            );
            let mut page = Vec::new();
            for row in db.query(&sql, &id_args)? {
                let status: String = row.get(2)?;
                let tags: String = row.get(15)?;
                let count = |i: usize| -> Result<Option<u64>, DbError> {
                    Ok(row
                        .get::<Option<i64>>(i)?
                        .map(|n| u64::try_from(n).unwrap_or(0)))
                };
                let hardware = match (count(10)?, count(11)?, count(12)?, count(13)?) {
                    (Some(cpus), Some(memory_bytes), Some(disks), Some(disk_bytes)) => {
                        Some(HardwareSummary {
                            cpus: u32::try_from(cpus).unwrap_or(u32::MAX),
                            memory_bytes,
                            disks: u32::try_from(disks).unwrap_or(u32::MAX),
                            disk_bytes,
                        })
                    }
                    _ => None,
                };
                page.push(MachineSummary {
                    id: row.get(0)?,
                    hostname: row.get(1)?,
                    status: Status::parse(&status).unwrap_or(Status::Broken),
                    status_message: row.get(3)?,
                    status_since: row.get(4)?,
                    boot_mac: row.get::<Option<String>>(5)?.and_then(|m| m.parse().ok()),
                    macs: Vec::new(),
                    arch: row.get(6)?,
                    power_driver: row.get::<Option<String>>(7)?.unwrap_or_default(),
                    power_state: row
                        .get::<Option<String>>(8)?
                        .and_then(|p| PowerState::parse(&p)),
                    power_seen_at: row.get(9)?,
                    hardware,
                    owner: row.get(14)?,
                    tags: from_json("tags", &tags)?,
                    heartbeat_step: row.get(16)?,
                    created_at: row.get(17)?,
                    updated_at: row.get(18)?,
                });
            }
            in_order_of(&ids, &mut page, |m| &m.id);
            let mut macs = Self::macs_of(db, &ids_in("machine_id", &ids).0, &id_args)?;
            for m in &mut page {
                let mut list = macs.remove(&m.id).unwrap_or_default();
                list.sort_by_key(|mac| Some(*mac) != m.boot_mac);
                m.macs = list;
            }
            Ok((total, page))
        })
    }

    /// Records the power state seen for machine `id` at `at` (ms). Not a change of the
    /// machine's record: no version bump, so it never conflicts with a status change.
    pub fn set_power_state(&self, id: &str, state: PowerState, at: i64) -> Result<(), StoreError> {
        self.run(|db| {
            db.execute(
                "UPDATE machines SET power_state = ?2, power_seen_at = ?3 WHERE id = ?1",
                &args![id, state.as_str(), at],
            )?;
            Ok(())
        })
    }

    /// The newest agent event of each machine in `ids`: a listing's "current step" column.
    pub fn latest_agent_events(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, EventRecord>, StoreError> {
        self.run(|db| {
            let mut out = HashMap::new();
            for id in ids {
                let row = db.query_opt(
                    "SELECT id, machine_id, at, actor, old_status, new_status, message FROM events
                     WHERE id = (SELECT MAX(id) FROM events WHERE machine_id = ?1 AND actor = 'agent')",
                    &args![id],
                )?;
                if let Some(row) = row {
                    out.insert(id.clone(), Self::event_from_row(&row)?);
                }
            }
            Ok(out)
        })
    }

    /// The newest event's id (0 for none): where a live view's stream starts.
    pub fn last_event_id(&self) -> Result<i64, StoreError> {
        self.run(|db| {
            Ok(db
                .query_one("SELECT COALESCE(MAX(id), 0) FROM events", &[])?
                .get(0)?)
        })
    }

    /// The MACs of every machine that network-boots the signed chain
    /// (`SignedBoot::machine_wants`, stored with each save): through the partial index, so
    /// the question costs what those machines cost, not what every machine does.
    pub fn signed_boot_macs(&self) -> Result<Vec<MacAddr>, StoreError> {
        self.run(|db| {
            let mut macs = Vec::new();
            for row in db.query(SIGNED_BOOT_MACS, &[])? {
                if let Ok(mac) = row.get::<String>(0)?.parse() {
                    macs.push(mac);
                }
            }
            Ok(macs)
        })
    }

    /// Machines in any of `statuses`: the timeout checker's question, answered without
    /// reading (and parsing) every machine.
    pub fn machines_in(&self, statuses: &[Status]) -> Result<Vec<Machine>, StoreError> {
        let where_sql = format!("WHERE status IN ({})", status_list(statuses));
        self.run(|db| Self::query_machines(&self.key, db, &where_sql, &[]))
    }

    /// By id, or by any of its MAC addresses.
    pub fn get_machine(&self, key: &str) -> Result<Machine, StoreError> {
        self.run(|db| Self::get_machine_in(&self.key, db, key))
    }

    fn get_machine_in(
        secrets: &SecretKey,
        db: &mut dyn Sql,
        key: &str,
    ) -> Result<Machine, StoreError> {
        let id = match key.parse::<MacAddr>() {
            Ok(mac) => db
                .query_opt(
                    "SELECT machine_id FROM interfaces WHERE mac = ?1",
                    &args![mac.to_string()],
                )?
                .map(|r| r.get::<String>(0))
                .transpose()?
                .unwrap_or_else(|| key.to_string()),
            Err(_) => key.to_string(),
        };
        Self::query_machines(secrets, db, "WHERE id = ?1", &args![id])?
            .pop()
            .ok_or_else(|| StoreError::NotFound(key.to_string()))
    }

    pub fn find_by_mac(&self, mac: MacAddr) -> Result<Option<Machine>, StoreError> {
        match self.get_machine(&mac.to_string()) {
            Ok(m) => Ok(Some(m)),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Inserts a new machine and its first event.
    pub fn create_machine(&self, m: &Machine, event: &NewEvent) -> Result<Machine, StoreError> {
        self.check_space()?;
        let placeholders: Vec<String> = (1..=MACHINE_COLUMNS.split(',').count())
            .map(|i| format!("?{i}"))
            .collect();
        let sql = format!(
            "INSERT INTO machines ({MACHINE_COLUMNS}) VALUES ({})",
            placeholders.join(",")
        );
        let row = self.machine_args(m);
        self.transaction(|db| {
            db.execute(&sql, &row)?;
            Self::put_interfaces(db, &m.id, &m.macs)?;
            Self::put_static_addresses(db, m)?;
            Self::insert_event(db, &m.id, event)?;
            Self::get_machine_in(&self.key, db, &m.id)
        })
    }

    fn put_interfaces(db: &mut dyn Sql, id: &str, macs: &[MacAddr]) -> Result<(), StoreError> {
        for mac in macs {
            let owner = Self::holder(
                db,
                "SELECT machine_id FROM interfaces WHERE mac = ?1",
                &[&mac.to_string()],
            )?;
            match owner {
                Some(o) if o != id => return Err(StoreError::MacTaken(*mac)),
                Some(_) => {}
                None => {
                    db.execute(
                        "INSERT INTO interfaces (mac, machine_id) VALUES (?1, ?2)",
                        &args![mac.to_string(), id],
                    )?;
                }
            }
        }
        Ok(())
    }

    /// The machine `sql` finds holding `key` (a MAC; a site and an address), if any.
    fn holder(db: &mut dyn Sql, sql: &str, key: &[&str]) -> Result<Option<String>, StoreError> {
        let key: Vec<Value> = key.iter().map(|k| Value::from(*k)).collect();
        Ok(db.query_opt(sql, &key)?.map(|r| r.get(0)).transpose()?)
    }

    /// Makes the static addresses `m` holds those of its deploy's network config, in its
    /// site; one another machine holds is refused. The key decides: of two saves at once
    /// (a pool's connections, two appliances) the second inserts nothing and is refused.
    fn put_static_addresses(db: &mut dyn Sql, m: &Machine) -> Result<(), StoreError> {
        let site = m.site.clone().unwrap_or_default();
        db.execute(
            "DELETE FROM static_addresses WHERE machine_id = ?1",
            &args![&m.id],
        )?;
        // Validation keeps an address to one interface: no insert conflicts with this one.
        for ip in m.deploy.iter().flat_map(|d| d.static_addresses()) {
            let inserted = db.execute(
                "INSERT INTO static_addresses (site, ip, machine_id) VALUES (?1, ?2, ?3)
                 ON CONFLICT (site, ip) DO NOTHING",
                &args![&site, ip.to_string(), &m.id],
            )?;
            if inserted == 0 {
                let machine = Self::holder(
                    db,
                    "SELECT machine_id FROM static_addresses WHERE site = ?1 AND ip = ?2",
                    &[&site, &ip.to_string()],
                )?
                .unwrap_or_default();
                return Err(StoreError::AddressTaken { ip, machine });
            }
        }
        Ok(())
    }

    /// Every static address deploys hold in `site` (a machine's, `""` for none), and the
    /// machine holding it.
    pub fn static_addresses(&self, site: &str) -> Result<Vec<(IpAddr, String)>, StoreError> {
        self.run(|db| {
            let rows = db.query(
                "SELECT ip, machine_id FROM static_addresses WHERE site = ?1",
                &args![site],
            )?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let ip: String = r.get(0)?;
                let machine: String = r.get(1)?;
                if let Ok(ip) = ip.parse() {
                    out.push((ip, machine));
                }
            }
            Ok(out)
        })
    }

    /// Saves `m` if its stored version is still `m.version`, with `events`, in one
    /// transaction. Returns the saved machine (version + 1).
    ///
    /// The heartbeat columns are written as `m` has them: a heartbeat that landed between the
    /// caller's read and this save (heartbeats do not bump the version) is set back by one
    /// beat, which costs at most one interval of the agent's allowance.
    ///
    /// The agent token's `used` mark (set without a version bump, by
    /// [`Store::mark_agent_token_used`]) is never set back: for the token already stored it
    /// only goes from false to true, whatever `m` holds. A save that would put a new token in
    /// place of a used one is a conflict: the boot script gives a successor only to an unused
    /// token (`lifecycle::boot::grant`), so its caller read the machine before the agent
    /// used it. Clearing the token (`None`) is always allowed.
    pub fn save_machine(&self, m: &Machine, events: &[NewEvent]) -> Result<Machine, StoreError> {
        let row = self.machine_args(m);
        self.transaction(|db| {
            // `?6` is the version the caller read.
            let changed = db.execute(
                "UPDATE machines SET hostname=?2, status=?3, status_message=?4, status_since=?5,
                    version=version+1, boot_mac=?7, arch=?8, power=?9, inventory=?10, owner=?11,
                    deploy=?12, tags=?13, agent_token=?14, updated_at=?16, netboot=?17,
                    erase_quick=?18, last_heartbeat=?19, heartbeat_step=?20,
                    heartbeat_deadline=?21, agent_ip=?22,
                    agent_token_used = CASE WHEN agent_token IS NOT DISTINCT FROM CAST(?14 AS TEXT)
                        THEN (CASE WHEN agent_token_used > ?23 THEN agent_token_used ELSE ?23 END)
                        ELSE ?23 END,
                    hw_cpus=?24, hw_memory_bytes=?25, hw_disks=?26, hw_disk_bytes=?27,
                    site=?28, commission_tests=?29, default_layout=?30, min_kernel=?31,
                    signed_boot=?32, created_at=?15
                 WHERE id=?1 AND version=?6
                   AND NOT (agent_token_used = 1 AND CAST(?14 AS TEXT) IS NOT NULL
                            AND agent_token IS DISTINCT FROM CAST(?14 AS TEXT))",
                &row,
            )?;
            if changed == 0 {
                let exists = db
                    .query_opt("SELECT 1 FROM machines WHERE id = ?1", &args![&m.id])?
                    .is_some();
                return Err(if exists {
                    StoreError::Conflict {
                        id: m.id.clone(),
                        expected: m.version,
                    }
                } else {
                    StoreError::NotFound(m.id.clone())
                });
            }
            Self::put_interfaces(db, &m.id, &m.macs)?;
            Self::put_static_addresses(db, m)?;
            for e in events {
                Self::insert_event(db, &m.id, e)?;
            }
            Self::get_machine_in(&self.key, db, &m.id)
        })
    }

    pub fn delete_machine(&self, id: &str) -> Result<(), StoreError> {
        self.run(|db| {
            if db.execute("DELETE FROM machines WHERE id = ?1", &args![id])? == 0 {
                return Err(StoreError::NotFound(id.to_string()));
            }
            Ok(())
        })
    }

    /// Marks the agent token with this hash used, and says whether this call did (only its
    /// first use changes anything). Like a heartbeat it does not bump the version, so the
    /// agent's first request never makes an operator's concurrent action fail; unlike a
    /// heartbeat it is never lost to such a save: [`Store::save_machine`] keeps a stored
    /// token's mark, and refuses to give a used token a successor.
    pub fn mark_agent_token_used(&self, hash: &str) -> Result<bool, StoreError> {
        self.run(|db| {
            let changed = db.execute(
                "UPDATE machines SET agent_token_used = 1
                 WHERE agent_token = ?1 AND agent_token_used = 0",
                &args![hash],
            )?;
            Ok(changed > 0)
        })
    }

    /// The machine whose current agent token has this hash.
    pub fn machine_by_agent_token(&self, hash: &str) -> Result<Option<Machine>, StoreError> {
        self.run(|db| {
            Ok(Self::query_machines(&self.key, db, "WHERE agent_token = ?1", &args![hash])?.pop())
        })
    }

    /// Records an agent's heartbeat on machine `id` if one is still expected there, and
    /// says whether it was. One is expected while the machine is in one of `statuses` and
    /// still network-boots its agent (an installed image ends that), unless the agent of the
    /// current status has already left: it sent heartbeats (`last_heartbeat` is not older
    /// than the status) and then cleared its deadline. `deadline` is when the next beat is
    /// due; `None` says the agent is leaving. Does not bump the version: a heartbeat is not
    /// a change anyone could conflict with.
    pub fn record_heartbeat(
        &self,
        id: &str,
        statuses: &[Status],
        at: i64,
        step: &str,
        deadline: Option<i64>,
    ) -> Result<bool, StoreError> {
        let sql = format!(
            "UPDATE machines SET last_heartbeat = ?2, heartbeat_step = ?3, heartbeat_deadline = ?4
             WHERE id = ?1 AND netboot = 1 AND status IN ({})
               AND (heartbeat_deadline IS NOT NULL OR last_heartbeat IS NULL
                    OR last_heartbeat < status_since)",
            status_list(statuses)
        );
        self.run(|db| Ok(db.execute(&sql, &args![id, at, step, deadline])? > 0))
    }

    // ---- events ----

    fn insert_event(db: &mut dyn Sql, machine_id: &str, e: &NewEvent) -> Result<(), StoreError> {
        let id: i64 = db
            .query_one(
                "INSERT INTO events (machine_id, at, actor, old_status, new_status, message)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
                &args![
                    machine_id,
                    e.at,
                    e.actor.as_str(),
                    e.old_status.map(|s| s.as_str()),
                    e.new_status.map(|s| s.as_str()),
                    e.message.as_str()
                ],
            )?
            .get(0)?;
        if db.dialect() == Dialect::Postgres {
            // Delivered at commit to every appliance listening (`Store::follow_changes`);
            // PostgreSQL folds the same notification sent twice in a transaction into one.
            db.execute(&format!("NOTIFY {CHANGES_CHANNEL}"), &[])?;
        }
        // Retention: a machine keeps its newest events only, so that a host sending reports
        // for a known MAC, or a machine in a loop, cannot grow the database without bound.
        if id % RETENTION_CHECK_EVERY == 0 {
            db.execute(
                "DELETE FROM events WHERE machine_id = ?1 AND id < (
                     SELECT id FROM events WHERE machine_id = ?1
                     ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                &args![machine_id, MAX_EVENTS_PER_MACHINE - 1],
            )?;
        }
        Ok(())
    }

    /// Refuses new records while the file system is nearly full (see [`MIN_FREE_BYTES`]).
    /// A file system that cannot be asked is let through: the write itself will tell. The
    /// answer is kept for [`SPACE_CHECK_EVERY`], so a flood of inserts does not stat the disk
    /// for each one.
    fn check_space(&self) -> Result<(), StoreError> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let now = Instant::now();
        let free = {
            let mut cached = self.space.lock().unwrap_or_else(|e| e.into_inner());
            match *cached {
                Some((at, free)) if now.duration_since(at) < SPACE_CHECK_EVERY => free,
                _ => {
                    let free = Self::free_bytes(dir);
                    *cached = Some((now, free));
                    free
                }
            }
        };
        let Some(free) = free else {
            return Ok(());
        };
        if free < MIN_FREE_BYTES {
            return Err(StoreError::DiskFull {
                dir: dir.to_path_buf(),
                free_mib: free >> 20,
                need_mib: MIN_FREE_BYTES >> 20,
            });
        }
        Ok(())
    }

    /// Bytes free to us under `dir`, if its file system answers.
    pub(crate) fn free_bytes(dir: &Path) -> Option<u64> {
        let st = nix::sys::statvfs::statvfs(dir).ok()?;
        #[allow(clippy::useless_conversion)] // the field types differ between targets
        Some(u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size())))
    }

    /// Appends an event without changing the machine (e.g. a rejected agent report).
    pub fn add_event(&self, machine_id: &str, e: &NewEvent) -> Result<(), StoreError> {
        self.check_space()?;
        self.transaction(|db| Self::insert_event(db, machine_id, e))
    }

    /// Events after `after_id`, oldest first, for one machine or all.
    pub fn events(
        &self,
        machine_id: Option<&str>,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let (sql, args) = Self::events_sql(machine_id, after_id, limit);
        self.run(|db| {
            db.query(sql, &args)?
                .iter()
                .map(Self::event_from_row)
                .collect()
        })
    }

    /// [`Store::events`]' statement: one machine's by its index on `(machine_id, id)`, all
    /// by id. One statement for both (`?2 IS NULL OR machine_id = ?2`) walked the whole
    /// table by id for one machine's history: 17.6 ms at 500,000 events against 0.01 ms.
    fn events_sql(
        machine_id: Option<&str>,
        after_id: i64,
        limit: u32,
    ) -> (&'static str, Vec<Value>) {
        match machine_id {
            Some(id) => (
                "SELECT id, machine_id, at, actor, old_status, new_status, message FROM events
                 WHERE machine_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
                args![id, after_id, limit].to_vec(),
            ),
            None => (
                "SELECT id, machine_id, at, actor, old_status, new_status, message FROM events
                 WHERE id > ?1 ORDER BY id LIMIT ?2",
                args![after_id, limit].to_vec(),
            ),
        }
    }

    /// An event from `SELECT id, machine_id, at, actor, old_status, new_status, message`.
    fn event_from_row(r: &Row) -> Result<EventRecord, StoreError> {
        let old: Option<String> = r.get(4)?;
        let new: Option<String> = r.get(5)?;
        Ok(EventRecord {
            id: r.get(0)?,
            machine_id: r.get(1)?,
            at: r.get(2)?,
            actor: r.get(3)?,
            old_status: old.as_deref().and_then(Status::parse),
            new_status: new.as_deref().and_then(Status::parse),
            message: r.get(6)?,
        })
    }

    // ---- API tokens and the audit log ----

    const TOKEN_COLUMNS: &'static str =
        "id, description, created_at, scope, expires_at, revoked_at";

    fn token_from_row(r: &Row) -> Result<TokenRecord, StoreError> {
        let scope: String = r.get(3)?;
        Ok(TokenRecord {
            id: r.get(0)?,
            description: r.get(1)?,
            created_at: r.get(2)?,
            // An unknown scope (a newer appliance's) grants the least.
            scope: TokenScope::parse(&scope).unwrap_or(TokenScope::ReadOnly),
            expires_at: r.get(4)?,
            revoked_at: r.get(5)?,
        })
    }

    pub fn add_token(&self, t: &TokenRecord, hash: &str) -> Result<(), StoreError> {
        self.run(|db| {
            db.execute(
                "INSERT INTO tokens (hash, id, description, created_at, scope, expires_at, revoked_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                &args![
                    hash,
                    &t.id,
                    &t.description,
                    t.created_at,
                    t.scope.as_str(),
                    t.expires_at,
                    t.revoked_at
                ],
            )?;
            Ok(())
        })
    }

    pub fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        let sql = format!("SELECT {} FROM tokens WHERE hash = ?1", Self::TOKEN_COLUMNS);
        self.run(|db| {
            db.query_opt(&sql, &args![hash])?
                .as_ref()
                .map(Self::token_from_row)
                .transpose()
        })
    }

    pub fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let sql = format!(
            "SELECT {} FROM tokens ORDER BY created_at",
            Self::TOKEN_COLUMNS
        );
        self.run(|db| {
            db.query(&sql, &[])?
                .iter()
                .map(Self::token_from_row)
                .collect()
        })
    }

    /// Revokes the token `id` at `at` (ms); revoking a revoked token keeps the first time.
    pub fn revoke_token(&self, id: &str, at: i64) -> Result<TokenRecord, StoreError> {
        let sql = format!("SELECT {} FROM tokens WHERE id = ?1", Self::TOKEN_COLUMNS);
        self.transaction(|db| {
            let changed = db.execute(
                "UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
                &args![id, at],
            )?;
            if changed == 0 {
                return Err(StoreError::NotFound(id.to_string()));
            }
            Self::token_from_row(&db.query_one(&sql, &args![id])?)
        })
    }

    pub fn add_audit(&self, a: &AuditRecord) -> Result<(), StoreError> {
        self.check_space()?;
        self.run(|db| {
            let id: i64 = db
                .query_one(
                    "INSERT INTO audit (at, actor, method, path, status) \
                     VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
                    &args![a.at, &a.actor, &a.method, &a.path, a.status],
                )?
                .get(0)?;
            // Retention, as for events: the newest entries only, so that no stream of
            // requests grows the database without bound.
            if id % RETENTION_CHECK_EVERY == 0 {
                db.execute(
                    "DELETE FROM audit WHERE id <= ?1",
                    &args![id - MAX_AUDIT_ENTRIES],
                )?;
            }
            Ok(())
        })
    }

    pub fn audit(&self, after: i64, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        self.run(|db| {
            db.query(
                "SELECT id, at, actor, method, path, status FROM audit WHERE id > ?1
                 ORDER BY id LIMIT ?2",
                &args![after, limit],
            )?
            .iter()
            .map(|r| {
                Ok(AuditRecord {
                    id: r.get(0)?,
                    at: r.get(1)?,
                    actor: r.get(2)?,
                    method: r.get(3)?,
                    path: r.get(4)?,
                    status: r.get(5)?,
                })
            })
            .collect()
        })
    }

    // ---- SSH keys and boot resources: small named JSON records ----

    pub fn add_ssh_key(&self, k: &SshKey) -> Result<(), StoreError> {
        self.run(|db| {
            db.execute(
                "INSERT INTO ssh_keys (id, name, key, created_at) VALUES (?1, ?2, ?3, ?4)",
                &args![&k.id, &k.name, &k.key, k.created_at],
            )?;
            Ok(())
        })
    }

    pub fn ssh_keys(&self) -> Result<Vec<SshKey>, StoreError> {
        self.run(|db| {
            db.query(
                "SELECT id, name, key, created_at FROM ssh_keys ORDER BY created_at",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(SshKey {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    key: r.get(2)?,
                    created_at: r.get(3)?,
                })
            })
            .collect()
        })
    }

    pub fn delete_ssh_key(&self, id: &str) -> Result<bool, StoreError> {
        self.run(|db| Ok(db.execute("DELETE FROM ssh_keys WHERE id = ?1", &args![id])? > 0))
    }

    pub fn put_boot_resource(&self, r: &BootResource, now: i64) -> Result<(), StoreError> {
        self.put_named("boot_resources", &r.name, r, now)
    }

    /// Adds (or replaces the body of) record `name` of `table`, one of the tables of named
    /// JSON records (`name`, `body`, `created_at`): boot resources, scripts, layouts.
    fn put_named<T: serde::Serialize>(
        &self,
        table: &'static str,
        name: &str,
        body: &T,
        created_at: i64,
    ) -> Result<(), StoreError> {
        self.run(|db| {
            db.execute(
                &format!(
                    "INSERT INTO {table} (name, body, created_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT(name) DO UPDATE SET body = excluded.body"
                ),
                &args![name, json(body), created_at],
            )?;
            Ok(())
        })
    }

    /// Every record of the named-records `table` ([`Store::put_named`]), by name.
    fn all_named<T: serde::de::DeserializeOwned>(
        &self,
        table: &'static str,
    ) -> Result<Vec<T>, StoreError> {
        self.run(|db| {
            db.query(&format!("SELECT body FROM {table} ORDER BY name"), &[])?
                .iter()
                .map(|r| from_json("body", &r.get::<String>(0)?))
                .collect()
        })
    }

    /// Record `name` of the named-records `table`, if there is one.
    fn one_named<T: serde::de::DeserializeOwned>(
        &self,
        table: &'static str,
        name: &str,
    ) -> Result<Option<T>, StoreError> {
        self.run(|db| {
            db.query_opt(
                &format!("SELECT body FROM {table} WHERE name = ?1"),
                &args![name],
            )?
            .map(|r| from_json("body", &r.get::<String>(0)?))
            .transpose()
        })
    }

    /// Whether record `name` of the named-records `table` was there to delete.
    fn delete_named(&self, table: &'static str, name: &str) -> Result<bool, StoreError> {
        self.run(|db| {
            Ok(db.execute(
                &format!("DELETE FROM {table} WHERE name = ?1"),
                &args![name],
            )? > 0)
        })
    }

    /// Adds (or replaces) a commissioning script.
    pub fn put_script(&self, sc: &Script) -> Result<(), StoreError> {
        self.put_named("scripts", &sc.name, sc, sc.created_at)
    }

    /// Adds (or replaces) a named storage layout.
    pub fn put_layout(&self, l: &NamedLayout) -> Result<(), StoreError> {
        self.put_named("layouts", &l.name, l, l.created_at)
    }

    /// Every named layout, by name.
    pub fn layouts(&self) -> Result<Vec<NamedLayout>, StoreError> {
        self.all_named("layouts")
    }

    pub fn layout(&self, name: &str) -> Result<Option<NamedLayout>, StoreError> {
        self.one_named("layouts", name)
    }

    /// Deletes the named layout unless a machine has it as its default: `Err` with those
    /// machines' ids (at most 10), `Ok(false)` when there was none.
    pub fn delete_layout(&self, name: &str) -> Result<Result<bool, Vec<String>>, StoreError> {
        self.transaction(|db| {
            let users = db
                .query(
                    "SELECT id FROM machines WHERE default_layout = ?1 ORDER BY id LIMIT 10",
                    &args![name],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect::<Result<Vec<String>, _>>()?;
            if !users.is_empty() {
                return Ok(Err(users));
            }
            Ok(Ok(db.execute(
                "DELETE FROM layouts WHERE name = ?1",
                &args![name],
            )? > 0))
        })
    }

    /// Every commissioning script, in name order (the order they run in).
    pub fn scripts(&self) -> Result<Vec<Script>, StoreError> {
        self.all_named("scripts")
    }

    /// Whether there was such a script.
    pub fn delete_script(&self, name: &str) -> Result<bool, StoreError> {
        self.delete_named("scripts", name)
    }

    /// Records a script's result on a machine (a second result of the same name replaces it).
    pub fn put_script_result(&self, machine_id: &str, r: &ScriptResult) -> Result<(), StoreError> {
        self.check_space()?;
        self.run(|db| {
            db.execute(
                "INSERT INTO script_results (machine_id, name, body, at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(machine_id, name) DO UPDATE SET body = excluded.body, at = excluded.at",
                &args![machine_id, &r.name, json(r), r.at],
            )?;
            Ok(())
        })
    }

    /// A machine's script results, in the order they were recorded.
    pub fn script_results(&self, machine_id: &str) -> Result<Vec<ScriptResult>, StoreError> {
        self.run(|db| {
            db.query(
                "SELECT body FROM script_results WHERE machine_id = ?1 ORDER BY at, name",
                &args![machine_id],
            )?
            .iter()
            .map(|r| from_json("body", &r.get::<String>(0)?))
            .collect()
        })
    }

    /// Forgets a machine's script results (a new commissioning starts).
    pub fn clear_script_results(&self, machine_id: &str) -> Result<(), StoreError> {
        self.run(|db| {
            db.execute(
                "DELETE FROM script_results WHERE machine_id = ?1",
                &args![machine_id],
            )?;
            Ok(())
        })
    }

    /// Whether there was such a resource.
    pub fn delete_boot_resource(&self, name: &str) -> Result<bool, StoreError> {
        self.delete_named("boot_resources", name)
    }

    pub fn boot_resources(&self) -> Result<Vec<BootResource>, StoreError> {
        self.all_named("boot_resources")
    }

    pub fn boot_resource(&self, name: &str) -> Result<Option<BootResource>, StoreError> {
        self.one_named("boot_resources", name)
    }
}

impl Db {
    fn run<T>(
        &self,
        f: impl FnOnce(&mut dyn Sql) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match self {
            Db::Sqlite(conn) => f(&mut Lite(&lock(conn))),
            Db::Postgres(pool, _) => f(&mut *pool.get().map_err(DbError::from)?),
        }
    }

    fn transaction<T>(
        &self,
        f: impl FnOnce(&mut dyn Sql) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match self {
            Db::Sqlite(conn) => {
                let mut conn = lock(conn);
                let tx = conn.transaction()?;
                let out = f(&mut Lite(&tx))?;
                tx.commit()?;
                Ok(out)
            }
            Db::Postgres(pool, _) => {
                let mut conn = pool.get().map_err(DbError::from)?;
                conn.client.batch_execute("BEGIN")?;
                match f(&mut *conn) {
                    Ok(out) => {
                        conn.client.batch_execute("COMMIT")?;
                        Ok(out)
                    }
                    Err(e) => {
                        // A broken connection is dropped by the pool; the server rolls back.
                        let _ = conn.client.batch_execute("ROLLBACK");
                        Err(e)
                    }
                }
            }
        }
    }
}

/// The PostgreSQL notification channel of new events.
const CHANGES_CHANNEL: &str = "stork_events";

/// How long the change listener waits before reconnecting to PostgreSQL, and how often it
/// asks `wake` whether anyone still listens.
const FOLLOW_RETRY: Duration = Duration::from_secs(1);

/// The change listener's loop: a connection of its own that LISTENs; reconnects after
/// PostgreSQL goes away. Ends when `alive` says nobody listens any more.
fn follow(config: &postgres::Config, wake: &dyn Fn(), alive: &dyn Fn() -> bool) {
    use postgres::fallible_iterator::FallibleIterator;
    let mut connected_before = false;
    while alive() {
        let listened = config.connect(postgres::NoTls).and_then(|mut c| {
            c.batch_execute(&format!("LISTEN {CHANGES_CHANNEL}"))
                .map(|_| c)
        });
        let mut client = match listened {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "PostgreSQL change listener cannot connect; retrying");
                std::thread::sleep(FOLLOW_RETRY);
                continue;
            }
        };
        if connected_before {
            // Events may have come while it was away.
            wake();
        }
        connected_before = true;
        while alive() && !client.is_closed() {
            match client.notifications().timeout_iter(FOLLOW_RETRY).next() {
                Ok(Some(_)) => wake(),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "PostgreSQL change listener lost its connection");
                    break;
                }
            }
        }
        std::thread::sleep(FOLLOW_RETRY);
    }
}

fn lock(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    // A panic mid-call leaves SQLite consistent (the transaction rolls back on drop).
    conn.lock().unwrap_or_else(|e| e.into_inner())
}

/// `'a', 'b'` for statuses: our own fixed identifiers, so they go into the SQL text.
fn status_list(statuses: &[Status]) -> String {
    let names: Vec<String> = statuses
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    names.join(", ")
}

/// `LIKE` pattern text for a literal: its `%`, `_` and `\\` escaped (with `ESCAPE '\\'`).
fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// What a machine listing sorts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortKey {
    #[default]
    Created,
    Hostname,
    Status,
    Id,
    Updated,
    Power,
}

/// A machine listing's filter, order and page, checked: the API's and the web UI's
/// question to [`Store::machine_page`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MachineQuery {
    pub status: Option<Status>,
    pub tag: Option<String>,
    pub power: Option<PowerState>,
    /// Part of a hostname, a MAC or an id.
    pub text: Option<String>,
    pub sort: SortKey,
    pub descending: bool,
    pub offset: u64,
    pub limit: Option<u64>,
    /// Summaries ([`Store::machine_summaries`]) rather than whole machines.
    pub summary: bool,
}

/// Puts `items` in the order of `ids` (a query by id returns them in its own order).
fn in_order_of<T>(ids: &[String], items: &mut [T], id: impl Fn(&T) -> &String) {
    let rank: HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| (id.as_str(), n))
        .collect();
    items.sort_by_key(|m| rank.get(id(m).as_str()).copied().unwrap_or(usize::MAX));
}

/// `WHERE column IN (?1, ...)` for `ids`, and its arguments.
fn ids_in(column: &str, ids: &[String]) -> (String, Vec<Value>) {
    let placeholders: Vec<String> = (1..=ids.len()).map(|i| format!("?{i}")).collect();
    (
        format!("WHERE {column} IN ({})", placeholders.join(", ")),
        ids.iter().map(Value::from).collect(),
    )
}

impl MachineQuery {
    /// The query's `WHERE` clause, its arguments, and its `ORDER BY ... LIMIT ... OFFSET`.
    #[allow(clippy::type_complexity)]
    fn sql(&self, dialect: Dialect) -> (String, Vec<Value>, String, Vec<Value>) {
        let mut clauses: Vec<String> = Vec::new();
        let mut args: Vec<Value> = Vec::new();
        // A clause's `?N` becomes the number of the argument it adds.
        let mut arg = |clauses: &mut Vec<String>, clause: &str, value: String| {
            args.push(Value::Text(value));
            clauses.push(clause.replace("?N", &format!("?{}", args.len())));
        };
        if let Some(st) = self.status {
            arg(&mut clauses, "status = ?N", st.as_str().to_string());
        }
        if let Some(tag) = &self.tag {
            arg(
                &mut clauses,
                &dialect.json_array_has("machines.tags", "?N"),
                tag.clone(),
            );
        }
        match self.power {
            Some(PowerState::Unknown) => {
                clauses.push("(power_state IS NULL OR power_state = 'unknown')".into())
            }
            Some(p) => arg(&mut clauses, "power_state = ?N", p.as_str().to_string()),
            None => {}
        }
        if let Some(text) = &self.text {
            let like = format!("%{}%", like_escape(&text.to_lowercase()));
            let like_op = dialect.like_nocase();
            arg(
                &mut clauses,
                &format!(
                    "(hostname {like_op} ?N ESCAPE '\\' OR id {like_op} ?N ESCAPE '\\' OR id IN \
                     (SELECT machine_id FROM interfaces WHERE mac {like_op} ?N ESCAPE '\\'))"
                ),
                like,
            );
        }
        let where_sql = if clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", clauses.join(" AND "))
        };
        let dir = if self.descending { "DESC" } else { "ASC" };
        let column = match self.sort {
            SortKey::Created => "created_at".to_string(),
            SortKey::Hostname => dialect.nocase("hostname"),
            SortKey::Status => "status".into(),
            SortKey::Id => "id".into(),
            SortKey::Updated => "updated_at".into(),
            SortKey::Power => "power_state".into(),
        };
        let nulls = dialect.nulls_as_sqlite(self.descending);
        // The page's bounds are parameters, not text: one prepared statement serves every
        // page (as text, each offset was a statement of its own, prepared again and again).
        let limit = dialect.limit(self.limit.map(|l| i64::try_from(l).unwrap_or(i64::MAX)));
        let offset = i64::try_from(self.offset).unwrap_or(i64::MAX);
        let n = args.len();
        let order_sql = format!(
            "ORDER BY {column} {dir}{nulls}, id {dir} LIMIT ?{} OFFSET ?{}",
            n + 1,
            n + 2
        );
        (where_sql, args, order_sql, vec![limit, Value::Int(offset)])
    }

    /// Checks a filter as the API and the UI receive it; the error names the field.
    pub fn from_filter(f: &MachineFilter) -> Result<Self, String> {
        fn some(v: &Option<String>) -> Option<&str> {
            v.as_deref().map(str::trim).filter(|s| !s.is_empty())
        }
        let status = match some(&f.status) {
            Some(st) => {
                Some(Status::parse(st).ok_or_else(|| format!("status: unknown status {st:?}"))?)
            }
            None => None,
        };
        let power = match some(&f.power) {
            Some(p) => Some(
                PowerState::parse(p)
                    .ok_or_else(|| format!("power: {p:?} is not one of on, off, unknown"))?,
            ),
            None => None,
        };
        let sort = match some(&f.sort) {
            None | Some("created") => SortKey::Created,
            Some("hostname") => SortKey::Hostname,
            Some("status") => SortKey::Status,
            Some("id") => SortKey::Id,
            Some("updated") => SortKey::Updated,
            Some("power") => SortKey::Power,
            Some(other) => return Err(format!("sort: {other:?} is not one of {SORT_KEYS:?}")),
        };
        let descending = match some(&f.order) {
            None | Some("asc") => false,
            Some("desc") => true,
            Some(other) => return Err(format!("order: {other:?} is not asc or desc")),
        };
        let text = some(&f.q).map(str::to_string);
        if text.as_ref().is_some_and(|t| t.len() > 256) {
            return Err("q: longer than 256 bytes".into());
        }
        Ok(Self {
            status,
            tag: some(&f.tag).map(str::to_string),
            power,
            text,
            sort,
            descending,
            offset: f.offset.unwrap_or(0),
            limit: f.limit,
            summary: match some(&f.view) {
                None | Some("full") => false,
                Some("summary") => true,
                Some(other) => return Err(format!("view: {other:?} is not full or summary")),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(id: &str, mac: &str) -> Machine {
        Machine::new(id.into(), vec![mac.parse().unwrap()], 1000)
    }

    pub(super) fn ev(msg: &str) -> NewEvent {
        NewEvent {
            at: 1000,
            actor: "test".into(),
            old_status: None,
            new_status: Some(Status::New),
            message: msg.into(),
        }
    }

    /// How the store's database would run `sql`: SQLite's `EXPLAIN QUERY PLAN` or
    /// PostgreSQL's `EXPLAIN`, as text. PostgreSQL scans a table of a few rows whatever its
    /// indexes: sequential scans are forbidden for the question, to see whether an index
    /// serves the query.
    pub(super) fn query_plan(s: &Store, sql: &str, args: &[Value]) -> String {
        s.run(|db| {
            // The plan's text: SQLite's fourth column, PostgreSQL's only one.
            let (rows, column) = match db.dialect() {
                Dialect::Sqlite => (db.query(&format!("EXPLAIN QUERY PLAN {sql}"), args)?, 3),
                Dialect::Postgres => {
                    db.execute("SET enable_seqscan = off", &[])?;
                    let rows = db.query(&format!("EXPLAIN {sql}"), args);
                    db.execute("RESET enable_seqscan", &[])?;
                    (rows?, 0)
                }
            };
            let lines: Vec<String> = rows
                .iter()
                .map(|r| r.get(column))
                .collect::<Result<_, _>>()?;
            Ok(lines.join("\n"))
        })
        .unwrap()
    }

    /// The MACs the store says boot the signed chain, sorted.
    pub(super) fn signed_macs(s: &Store) -> Vec<String> {
        let mut macs: Vec<String> = s
            .signed_boot_macs()
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        macs.sort();
        macs
    }

    /// The store keeps which machines boot the signed chain with each save, as
    /// `SignedBoot::machine_wants` says, and answers their MACs through its index.
    pub(super) fn signed_boot_machines_are_kept_with_each_save(open: &dyn Fn() -> Store) {
        use crate::lifecycle::secure_boot::{SignedBoot, TAG};
        use stork_proto::inventory::Inventory;
        let s = open();
        let add = |id: &str, mac: &str, tags: &[&str], secure_boot: Option<bool>| {
            let mut m = machine(id, mac);
            m.tags = tags.iter().map(|t| t.to_string()).collect();
            m.inventory = secure_boot.map(|sb| Inventory {
                secure_boot: Some(sb),
                ..Default::default()
            });
            s.create_machine(&m, &ev("created")).unwrap()
        };
        let tagged = add("s1", "52:54:00:00:02:01", &[TAG], None);
        add("s2", "52:54:00:00:02:02", &[], Some(true));
        let off = add("s3", "52:54:00:00:02:03", &["rack-a"], Some(false));
        add("s4", "52:54:00:00:02:04", &[], None);
        assert_eq!(signed_macs(&s), ["52:54:00:00:02:01", "52:54:00:00:02:02"]);
        // The tag taken off, Secure Boot seen on: the set follows the saves.
        let mut untagged = tagged.clone();
        untagged.tags.clear();
        s.save_machine(&untagged, &[]).unwrap();
        let mut on = off.clone();
        on.inventory = Some(Inventory {
            secure_boot: Some(true),
            ..Default::default()
        });
        s.save_machine(&on, &[]).unwrap();
        assert_eq!(signed_macs(&s), ["52:54:00:00:02:02", "52:54:00:00:02:03"]);
        // The stored flag is the predicate's, machine by machine.
        let expected: Vec<String> = s
            .list_machines()
            .unwrap()
            .iter()
            .filter(|m| SignedBoot::machine_wants(m))
            .flat_map(|m| m.macs.iter().map(ToString::to_string))
            .collect();
        assert_eq!(signed_macs(&s), expected);
        let plan = query_plan(&s, SIGNED_BOOT_MACS, &[]);
        assert!(plan.contains("machines_signed_boot"), "{plan}");
    }

    /// One machine's history is read through the index on `(machine_id, id)`, never by
    /// walking every machine's events.
    pub(super) fn a_machines_events_are_read_by_its_index(open: &dyn Fn() -> Store) {
        let s = open();
        s.create_machine(&machine("e1", "52:54:00:00:01:01"), &ev("one"))
            .unwrap();
        s.create_machine(&machine("e2", "52:54:00:00:01:02"), &ev("two"))
            .unwrap();
        for n in 0..3 {
            for id in ["e1", "e2"] {
                s.add_event(id, &ev(&format!("{id} {n}"))).unwrap();
            }
        }
        let mine = s.events(Some("e2"), 0, 100).unwrap();
        let messages: Vec<&str> = mine.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(messages, ["two", "e2 0", "e2 1", "e2 2"]);
        let later = s.events(Some("e2"), mine[1].id, 2).unwrap();
        assert_eq!(later.len(), 2);
        assert_eq!(later[0].message, "e2 1");
        assert_eq!(s.events(None, 0, 100).unwrap().len(), 8);
        assert!(s.events(Some("nobody"), 0, 100).unwrap().is_empty());

        let (sql, args) = Store::events_sql(Some("e2"), 0, 100);
        let plan = query_plan(&s, sql, &args);
        assert!(plan.contains("events_machine"), "{plan}");
    }

    pub(super) fn a_static_address_is_held_by_one_machine(open: &dyn Fn() -> Store) {
        let s = open();
        let deploying = |id: &str, mac: &str, addr: &str| {
            let mut m = s.create_machine(&machine(id, mac), &ev("created")).unwrap();
            m.deploy = Some(DeployRequest {
                image: "debian-12".into(),
                network: Some(
                    serde_json::from_str(&format!(
                        r#"{{"interfaces": [{{"name": "en0", "mac": "{mac}", "addresses": ["{addr}"]}}]}}"#
                    ))
                    .unwrap(),
                ),
                ..Default::default()
            });
            m
        };
        let a = deploying("a1", "52:54:00:00:00:01", "10.77.0.50/24");
        let a = s.save_machine(&a, &[]).unwrap();
        let ip: IpAddr = "10.77.0.50".parse().unwrap();
        assert_eq!(s.static_addresses("").unwrap(), [(ip, "a1".to_string())]);
        // Saving it again keeps it.
        let a = s.save_machine(&a, &[]).unwrap();
        let b = deploying("b2", "52:54:00:00:00:02", "10.77.0.50/24");
        match s.save_machine(&b, &[]) {
            Err(StoreError::AddressTaken { ip: taken, machine }) => {
                assert_eq!((taken, machine.as_str()), (ip, "a1"));
            }
            other => panic!("a second holder was not refused: {other:?}"),
        }
        // The refused save changed nothing; once a's deploy is cleared, b may have it.
        let mut a = a;
        a.deploy = None;
        s.save_machine(&a, &[]).unwrap();
        let b = s.save_machine(&b, &[]).unwrap();
        assert_eq!(s.static_addresses("").unwrap(), [(ip, "b2".to_string())]);
        // Another site is another network: the same address is its own there.
        let mut c = deploying("c3", "52:54:00:00:00:03", "10.77.0.50/24");
        c.site = Some("rack-b".into());
        s.save_machine(&c, &[]).unwrap();
        assert_eq!(
            s.static_addresses("rack-b").unwrap(),
            [(ip, "c3".to_string())]
        );
        // Deleting the machine frees it.
        s.delete_machine(&b.id).unwrap();
        assert!(s.static_addresses("").unwrap().is_empty());
    }

    pub(super) fn create_get_save_with_version_check(open: &dyn Fn() -> Store) {
        let s = open();
        let m = s
            .create_machine(&machine("a1", "52:54:00:00:00:01"), &ev("created"))
            .unwrap();
        assert_eq!(s.get_machine("52:54:00:00:00:01").unwrap().id, "a1");
        let mut m2 = m.clone();
        m2.status = Status::Commissioning;
        let saved = s.save_machine(&m2, &[ev("commission")]).unwrap();
        assert_eq!(saved.version, m.version + 1);
        // A second writer with the old version loses.
        assert!(matches!(
            s.save_machine(&m2, &[]),
            Err(StoreError::Conflict { .. })
        ));
        assert_eq!(s.events(Some("a1"), 0, 100).unwrap().len(), 2);
        // MACs are unique across machines.
        assert!(matches!(
            s.create_machine(&machine("b2", "52:54:00:00:00:01"), &ev("dup")),
            Err(StoreError::MacTaken(_))
        ));
        // Survives reopening.
        drop(s);
        let s = open();
        assert_eq!(s.get_machine("a1").unwrap().status, Status::Commissioning);
        assert_eq!(s.list_machines().unwrap().len(), 1);
    }

    pub(super) fn summaries_carry_the_hardware_written_with_the_inventory(
        open: &dyn Fn() -> Store,
    ) {
        let s = open();
        let inv = |cpus: u32, disks: &[u64]| -> stork_proto::Inventory {
            let disks: Vec<serde_json::Value> = disks
                .iter()
                .enumerate()
                .map(|(n, size)| {
                    serde_json::json!({"name": format!("sd{n}"), "size_bytes": size, "partitions": []})
                })
                .collect();
            let mut i = stork_proto::Inventory::default();
            i.memory.total_bytes = 8 << 30;
            i.disks = disks
                .into_iter()
                .map(|d| serde_json::from_value(d).unwrap())
                .collect();
            i.cpu.count = cpus;
            i
        };
        let mut a = machine("a1", "52:54:00:00:00:01");
        a.inventory = Some(inv(4, &[1 << 30, 3 << 30]));
        a.macs.push("52:54:00:00:00:11".parse().unwrap());
        let a = s.create_machine(&a, &ev("created")).unwrap();
        s.create_machine(&machine("b2", "52:54:00:00:00:02"), &ev("created"))
            .unwrap();
        let q = MachineQuery {
            summary: true,
            ..MachineQuery::default()
        };
        let (total, page) = s.machine_summaries(&q).unwrap();
        assert_eq!(total, 2);
        assert_eq!(page[0].id, "a1");
        assert_eq!(
            page[0].hardware,
            a.inventory.as_ref().map(HardwareSummary::of)
        );
        assert_eq!(page[0].hardware.map(|h| h.disk_bytes), Some(4 << 30));
        assert_eq!(page[0].macs, a.macs);
        assert_eq!(page[0].power_driver, "manual");
        assert_eq!(page[1].hardware, None, "no inventory yet");
        // A new inventory (commissioning again) moves the summary with it.
        let mut a2 = a.clone();
        a2.inventory = Some(inv(16, &[]));
        s.save_machine(&a2, &[]).unwrap();
        let (_, page) = s.machine_summaries(&q).unwrap();
        assert_eq!(
            page[0].hardware,
            a2.inventory.as_ref().map(HardwareSummary::of)
        );
        assert_eq!(page[0].hardware.map(|h| (h.cpus, h.disks)), Some((16, 0)));
        // Whole machines and summaries page the same way.
        let q = MachineQuery {
            descending: true,
            limit: Some(1),
            ..q
        };
        let (_, whole) = s.machine_page(&q).unwrap();
        let (_, summary) = s.machine_summaries(&q).unwrap();
        assert_eq!(whole[0].id, "b2");
        assert_eq!(summary[0].id, "b2");
    }

    pub(super) fn heartbeats_are_recorded_only_while_expected(open: &dyn Fn() -> Store) {
        let s = open();
        let agent = [Status::Deploying];
        let mut m = s
            .create_machine(&machine("h1", "52:54:00:00:00:02"), &ev("created"))
            .unwrap();
        // Not in an agent status: refused.
        assert!(
            !s.record_heartbeat("h1", &agent, 1500, "x", Some(9000))
                .unwrap()
        );
        m.status = Status::Deploying;
        m.status_since = 2000;
        let m = s.save_machine(&m, &[]).unwrap();
        assert!(
            s.record_heartbeat("h1", &agent, 2500, "image", Some(5000))
                .unwrap()
        );
        let got = s.get_machine("h1").unwrap();
        assert_eq!(
            (
                got.last_heartbeat,
                got.heartbeat_step.as_deref(),
                got.heartbeat_deadline
            ),
            (Some(2500), Some("image"), Some(5000))
        );
        // Heartbeats are not changes: the version stays, so no save races with them.
        assert_eq!(got.version, m.version);
        // Leaving clears the deadline, and nothing re-arms it in this status.
        assert!(
            s.record_heartbeat("h1", &agent, 2600, "memory", None)
                .unwrap()
        );
        assert!(
            !s.record_heartbeat("h1", &agent, 2700, "memory", Some(6000))
                .unwrap()
        );
        assert_eq!(s.get_machine("h1").unwrap().heartbeat_deadline, None);
        // A new status's agent is heard again.
        let mut again = s.get_machine("h1").unwrap();
        again.status_since = 3000;
        s.save_machine(&again, &[]).unwrap();
        assert!(
            s.record_heartbeat("h1", &agent, 3100, "disk", Some(7000))
                .unwrap()
        );
        // An installed image ends heartbeats (the agent is rebooting away).
        let mut installed = s.get_machine("h1").unwrap();
        installed.netboot = false;
        s.save_machine(&installed, &[]).unwrap();
        assert!(
            !s.record_heartbeat("h1", &agent, 3200, "x", Some(8000))
                .unwrap()
        );
        assert!(
            !s.record_heartbeat("nope", &agent, 3200, "x", Some(8000))
                .unwrap()
        );
    }
}

#[cfg(test)]
mod listing_tests {
    use super::*;

    fn add(s: &Store, id: &str, n: u8, hostname: Option<&str>, tags: &[&str]) -> Machine {
        let mac = MacAddr([0x52, 0x54, 0, 0, 0xab, n]);
        let mut m = Machine::new(id.into(), vec![mac], i64::from(n));
        m.hostname = hostname.map(str::to_string);
        m.tags = tags.iter().map(|t| t.to_string()).collect();
        let ev = NewEvent {
            at: 0,
            actor: "test".into(),
            old_status: None,
            new_status: Some(Status::New),
            message: "created".into(),
        };
        s.create_machine(&m, &ev).unwrap()
    }

    fn ids(s: &Store, q: MachineQuery) -> (u64, Vec<String>) {
        let (total, page) = s.machine_page(&q).unwrap();
        let (sum_total, summaries) = s
            .machine_summaries(&MachineQuery { summary: true, ..q })
            .unwrap();
        let page: Vec<String> = page.into_iter().map(|m| m.id).collect();
        let summaries: Vec<String> = summaries.into_iter().map(|m| m.id).collect();
        assert_eq!(
            (total, &page),
            (sum_total, &summaries),
            "whole and summary agree"
        );
        (total, page)
    }

    /// Filters, text search, sort orders (NULLs first going up) and paging: what the API's
    /// and the UI's listing asks.
    pub(super) fn listing_filters_sorts_and_searches(open: &dyn Fn() -> Store) {
        let s = open();
        add(&s, "m-a", 1, Some("Web-1"), &["rack1", "gpu"]);
        let b = add(&s, "m-b", 2, None, &["rack2"]);
        add(&s, "m-c", 3, Some("db_1"), &["rack1"]);
        add(&s, "m-d", 4, Some("web-2"), &[]);
        let mut b2 = b.clone();
        b2.status = Status::Ready;
        s.save_machine(&b2, &[]).unwrap();
        s.set_power_state("m-c", PowerState::On, 10).unwrap();
        let q = MachineQuery::default;
        let all = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(ids(&s, q()), (4, all(&["m-a", "m-b", "m-c", "m-d"])));
        let ready = MachineQuery {
            status: Some(Status::Ready),
            ..q()
        };
        assert_eq!(ids(&s, ready), (1, all(&["m-b"])));
        let rack1 = MachineQuery {
            tag: Some("rack1".into()),
            ..q()
        };
        assert_eq!(ids(&s, rack1), (2, all(&["m-a", "m-c"])));
        let on = MachineQuery {
            power: Some(PowerState::On),
            ..q()
        };
        assert_eq!(ids(&s, on), (1, all(&["m-c"])));
        let unknown = MachineQuery {
            power: Some(PowerState::Unknown),
            ..q()
        };
        assert_eq!(ids(&s, unknown).0, 3);
        // Text matches hostnames whatever their case, ids and MACs; `_` is a literal.
        let text = |t: &str| MachineQuery {
            text: Some(t.into()),
            ..q()
        };
        assert_eq!(ids(&s, text("WEB")), (2, all(&["m-a", "m-d"])));
        assert_eq!(ids(&s, text("db_")), (1, all(&["m-c"])));
        assert_eq!(ids(&s, text("eb_")).0, 0, "`_` matched `-`");
        assert_eq!(ids(&s, text("52:54:00:00:ab:02")), (1, all(&["m-b"])));
        // Hostname order ignores case; no hostname sorts first going up, last going down.
        let by_name = MachineQuery {
            sort: SortKey::Hostname,
            ..q()
        };
        assert_eq!(
            ids(&s, by_name.clone()).1,
            all(&["m-b", "m-c", "m-a", "m-d"])
        );
        let by_name_down = MachineQuery {
            descending: true,
            ..by_name
        };
        assert_eq!(ids(&s, by_name_down).1, all(&["m-d", "m-a", "m-c", "m-b"]));
        let by_power = MachineQuery {
            sort: SortKey::Power,
            ..q()
        };
        assert_eq!(ids(&s, by_power).1.last().map(String::as_str), Some("m-c"));
        // A page: its total is the whole selection's.
        let page = MachineQuery {
            sort: SortKey::Id,
            descending: true,
            offset: 1,
            limit: Some(2),
            ..q()
        };
        assert_eq!(ids(&s, page), (4, all(&["m-c", "m-b"])));
        let past = MachineQuery { offset: 10, ..q() };
        assert_eq!(ids(&s, past), (4, vec![]));
        // Deleting takes the machine's interfaces with it: its MAC is free again.
        s.delete_machine("m-a").unwrap();
        assert!(matches!(
            s.delete_machine("m-a"),
            Err(StoreError::NotFound(_))
        ));
        add(&s, "m-e", 1, None, &[]);
        assert_eq!(s.get_machine("52:54:00:00:ab:01").unwrap().id, "m-e");
    }

    /// Tokens, the audit log, SSH keys and boot resources round-trip.
    pub(super) fn tokens_audit_keys_and_resources(open: &dyn Fn() -> Store) {
        let s = open();
        let t = TokenRecord {
            id: "t1".into(),
            description: "ci".into(),
            created_at: 5,
            scope: TokenScope::Operator,
            expires_at: Some(99),
            revoked_at: None,
        };
        s.add_token(&t, "hash-1").unwrap();
        assert_eq!(s.token_by_hash("hash-1").unwrap(), Some(t.clone()));
        assert_eq!(s.token_by_hash("nope").unwrap(), None);
        let revoked = s.revoke_token("t1", 50).unwrap();
        assert_eq!(revoked.revoked_at, Some(50));
        assert_eq!(s.revoke_token("t1", 60).unwrap().revoked_at, Some(50));
        assert!(matches!(
            s.revoke_token("t9", 1),
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(s.list_tokens().unwrap().len(), 1);
        for n in 0..3 {
            s.add_audit(&AuditRecord {
                id: 0,
                at: n,
                actor: "api:t1".into(),
                method: "POST".into(),
                path: format!("/api/v1/x/{n}"),
                status: 201,
            })
            .unwrap();
        }
        let audit = s.audit(0, 10).unwrap();
        assert_eq!(audit.len(), 3);
        assert_eq!(s.audit(audit[0].id, 1).unwrap()[0].path, "/api/v1/x/1");
        let key = SshKey {
            id: "k1".into(),
            name: "me".into(),
            key: "ssh-ed25519 AAAA me@host".into(),
            created_at: 1,
        };
        s.add_ssh_key(&key).unwrap();
        assert_eq!(s.ssh_keys().unwrap(), vec![key]);
        assert!(s.delete_ssh_key("k1").unwrap());
        assert!(!s.delete_ssh_key("k1").unwrap());
        let mut r = BootResource {
            name: "debian".into(),
            kind: "os".into(),
            arch: Some("amd64".into()),
            files: vec![],
            kernels: vec![stork_proto::kernel::ImageKernel {
                name: "stable".into(),
                version: "6.1.0-50-amd64".into(),
            }],
        };
        s.put_boot_resource(&r, 1).unwrap();
        r.kind = "ephemeral".into();
        s.put_boot_resource(&r, 2).unwrap();
        assert_eq!(s.boot_resources().unwrap(), vec![r.clone()]);
        assert_eq!(s.boot_resource("debian").unwrap(), Some(r));
        assert_eq!(s.boot_resource("other").unwrap(), None);
        // What a host sent with a NUL in it is kept (PostgreSQL's text cannot hold one).
        s.add_event(
            "nobody",
            &NewEvent {
                at: 1,
                actor: "agent".into(),
                old_status: None,
                new_status: None,
                message: "bad\0byte".into(),
            },
        )
        .unwrap();
        let last = s.events(Some("nobody"), 0, 10).unwrap();
        assert!(last[0].message.starts_with("bad") && last[0].message.ends_with("byte"));
        assert_eq!(s.last_event_id().unwrap(), last[0].id);
    }
}

/// Every backend-neutral case, run on SQLite here and on PostgreSQL below.
#[cfg(test)]
mod backends {
    use super::*;

    type Case = fn(&dyn Fn() -> Store);

    const CASES: &[(&str, Case)] = &[
        ("create_get_save", tests::create_get_save_with_version_check),
        ("static_addresses", tests::a_static_address_is_held_by_one_machine),
        ("summaries", tests::summaries_carry_the_hardware_written_with_the_inventory),
        ("heartbeats", tests::heartbeats_are_recorded_only_while_expected),
        ("retention", retention_tests::a_machine_keeps_its_newest_events),
        ("audit_retention", retention_tests::the_audit_log_keeps_its_newest_entries),
        (
            "agent_token",
            agent_token_tests::a_save_that_read_the_machine_before_the_token_was_used_cannot_undo_it,
        ),
        (
            "agent_token_index",
            agent_token_tests::a_token_is_found_through_its_index,
        ),
        ("events_index", tests::a_machines_events_are_read_by_its_index),
        ("signed_boot", tests::signed_boot_machines_are_kept_with_each_save),
        ("listing", listing_tests::listing_filters_sorts_and_searches),
        ("records", listing_tests::tokens_audit_keys_and_resources),
        (
            "power_requests",
            power_requests::tests::requests_are_taken_once_by_their_site_oldest_first,
        ),
    ];

    #[test]
    fn a_database_value_that_cannot_be_read_is_named_without_its_password() {
        let err = Database::parse("postgre://admin:hunter2@10.0.0.9/stork").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("\"postgre\""), "{err}");
        assert_eq!(
            Database::parse("sqlite:/var/lib/stork/stork.db"),
            Ok(Database::Sqlite("/var/lib/stork/stork.db".into()))
        );
        let url = "postgres://admin:hunter2@10.0.0.9/stork";
        let pg = Database::parse(url).unwrap();
        assert_eq!(pg, Database::Postgres(url.into()));
        // Shown (in `config check`, in errors) without the password.
        assert!(!format!("{pg:?} {pg}").contains("hunter2"));
    }

    #[test]
    fn every_case_on_sqlite() {
        for (name, case) in CASES {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("stork.db");
            eprintln!("case {name}");
            case(&|| Store::open(&path).unwrap());
        }
    }

    #[test]
    fn a_postgres_database_a_newer_stork_migrated_is_refused_by_name() {
        let pg = stork_lab::postgres::ScratchPostgres::start().unwrap();
        let url = pg.create_database("newer").unwrap();
        let keys = tempfile::tempdir().unwrap();
        let key = keys.path().join("secrets.key");
        drop(Store::open_postgres(&url, &key).unwrap());
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        c.execute(
            &format!(
                "INSERT INTO {} (version, name, applied_on, checksum) \
                 VALUES (99, 'from_the_future', '2030-01-01T00:00:00Z', '1')",
                migrate::HISTORY_TABLE
            ),
            &[],
        )
        .unwrap();
        let err = Store::open_postgres(&url, &key).unwrap_err();
        let chain = anyhow::Error::from(err);
        let text = format!("{chain:#}");
        assert!(text.contains("from_the_future"), "{text}");
        // A wrong URL names what is wrong with it.
        let bad = Store::open_postgres("postgres://x:y@/db?sslmode=nonsense", &key).unwrap_err();
        assert!(bad.to_string().contains("not a PostgreSQL URL"), "{bad}");
    }

    /// Machines stored before the column existed get it from their tags and inventories.
    #[test]
    fn signed_boot_is_filled_in_on_postgres_for_machines_stored_before() {
        let pg = stork_lab::postgres::ScratchPostgres::start().unwrap();
        let url = pg.create_database("before").unwrap();
        let keys = tempfile::tempdir().unwrap();
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        migrate::migrate_postgres_to(&mut c, 7);
        for sql in migrate::BEFORE_SIGNED_BOOT {
            c.batch_execute(sql).unwrap();
        }
        drop(c);
        let s = Store::open_postgres(&url, &keys.path().join("secrets.key")).unwrap();
        assert_eq!(tests::signed_macs(&s), migrate::SIGNED_BEFORE);
    }

    /// A machine with every field set, different for each `n`.
    fn rich_machine(n: u32) -> Machine {
        let mac = |k: u8| MacAddr([0x52, 0x54, (n >> 16) as u8, (n >> 8) as u8, n as u8, k]);
        let mut m = Machine::new(format!("m-{n:05}"), vec![mac(1), mac(2)], i64::from(n));
        m.hostname = Some(format!("Node-{n}"));
        m.status = Status::ALL[n as usize % Status::ALL.len()];
        m.status_message = n
            .is_multiple_of(3)
            .then(|| format!("reason {n}: 'quoted' \"too\""));
        m.status_since = 1_000 + i64::from(n);
        m.boot_mac = Some(mac(1));
        m.arch = if n.is_multiple_of(2) {
            "amd64"
        } else {
            "arm64"
        }
        .into();
        let mut params = serde_json::Map::new();
        params.insert(
            "host".into(),
            format!("10.9.{}.{}", n / 250, n % 250).into(),
        );
        params.insert("username".into(), "admin".into());
        params.insert("password".into(), format!("pw-{n}-secret").into());
        m.power = PowerConfig {
            driver: "ipmi".into(),
            params,
        };
        let mut inv = stork_proto::Inventory::default();
        inv.cpu.count = n % 64 + 1;
        inv.memory.total_bytes = u64::from(n) << 20;
        inv.kernel = "6.1.0-test".into();
        m.inventory = (!n.is_multiple_of(5)).then_some(inv);
        m.owner = n.is_multiple_of(4).then(|| "ops".into());
        m.deploy = n.is_multiple_of(7).then(|| DeployRequest {
            image: "debian-12".into(),
            hostname: Some(format!("d{n}")),
            ..DeployRequest::default()
        });
        m.tags = vec![format!("rack{}", n % 10), "gpu".into()];
        m.agent = AgentIdentity {
            token_hash: Some(format!("{n:064x}")),
            ip: Some(std::net::IpAddr::from([10, 77, (n >> 8) as u8, n as u8])),
            used: n % 2 == 1,
        };
        m.netboot = n % 3 != 1;
        m.erase_quick = n.is_multiple_of(2);
        m.last_heartbeat = Some(i64::from(n) * 7);
        m.heartbeat_step = Some("image".into());
        m.heartbeat_deadline = n.is_multiple_of(2).then_some(i64::from(n) * 9);
        m
    }

    /// Everything a store holds, as its readers see it.
    #[allow(clippy::type_complexity)]
    fn contents(
        s: &Store,
    ) -> (
        Vec<Machine>,
        Vec<EventRecord>,
        Vec<TokenRecord>,
        Vec<SshKey>,
        Vec<BootResource>,
        Vec<AuditRecord>,
        (u64, Vec<MachineSummary>),
    ) {
        let summaries = s
            .machine_summaries(&MachineQuery {
                summary: true,
                ..MachineQuery::default()
            })
            .unwrap();
        (
            s.list_machines().unwrap(),
            s.events(None, 0, u32::MAX).unwrap(),
            s.list_tokens().unwrap(),
            s.ssh_keys().unwrap(),
            s.boot_resources().unwrap(),
            s.audit(0, u32::MAX).unwrap(),
            summaries,
        )
    }

    /// SQLite to PostgreSQL and back (`stork db migrate`), 10,000 machines: every field of
    /// every record equal at each end, sealed passwords opened with the one key, ids kept.
    #[test]
    fn ten_thousand_machines_round_trip_sqlite_postgres_sqlite() {
        const MACHINES: u32 = 10_000;
        // On tmpfs where there is one: each of the 10,000 creations is a durable commit.
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm).unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        let key = dir.path().join("secrets.key");
        let first = Store::open_with_key(&dir.path().join("a.db"), &key).unwrap();
        for n in 0..MACHINES {
            let m = rich_machine(n);
            first
                .create_machine(
                    &m,
                    &NewEvent {
                        at: i64::from(n),
                        actor: "api:t1".into(),
                        old_status: None,
                        new_status: Some(m.status),
                        message: format!("created {n}"),
                    },
                )
                .unwrap();
        }
        first
            .set_power_state("m-00003", PowerState::On, 77)
            .unwrap();
        let t = TokenRecord {
            id: "t1".into(),
            description: "admin".into(),
            created_at: 1,
            scope: TokenScope::Admin,
            expires_at: Some(9),
            revoked_at: Some(8),
        };
        first.add_token(&t, "hash-t1").unwrap();
        first
            .add_ssh_key(&SshKey {
                id: "k1".into(),
                name: "me".into(),
                key: "ssh-ed25519 AAAA me".into(),
                created_at: 2,
            })
            .unwrap();
        first
            .put_boot_resource(
                &BootResource {
                    name: "debian-12".into(),
                    kind: "os".into(),
                    arch: Some("amd64".into()),
                    files: vec![],
                    kernels: vec![],
                },
                3,
            )
            .unwrap();
        first
            .add_audit(&AuditRecord {
                id: 0,
                at: 4,
                actor: "api:t1".into(),
                method: "POST".into(),
                path: "/api/v1/machines".into(),
                status: 201,
            })
            .unwrap();
        let want = contents(&first);
        assert_eq!(want.0.len(), MACHINES as usize);

        let pg = stork_lab::postgres::ScratchPostgres::start().unwrap();
        let url = pg.create_database("moved").unwrap();
        let second = Store::open_postgres(&url, &key).unwrap();
        copy::tests::the_copy_names_every_column(&second);
        let report = first.copy_into(&second).unwrap();
        assert_eq!(report.rows[0], ("machines", u64::from(MACHINES)));
        assert_eq!(contents(&second), want, "SQLite to PostgreSQL");
        assert_eq!(second.token_by_hash("hash-t1").unwrap(), Some(t));
        // Into a store that holds records: refused, nothing written.
        assert!(matches!(
            first.copy_into(&second),
            Err(StoreError::NotEmpty { .. })
        ));

        let third = Store::open_with_key(&dir.path().join("c.db"), &key).unwrap();
        second.copy_into(&third).unwrap();
        assert_eq!(contents(&third), want, "PostgreSQL back to SQLite");
        // New events are numbered after the copied ones.
        let last = want.1.last().unwrap().id;
        second.add_event("m-00001", &ev_at(5)).unwrap();
        assert!(second.last_event_id().unwrap() > last);
    }

    fn ev_at(at: i64) -> NewEvent {
        NewEvent {
            at,
            actor: "test".into(),
            old_status: None,
            new_status: None,
            message: "after the move".into(),
        }
    }

    #[test]
    fn every_case_on_postgres() {
        let pg = stork_lab::postgres::ScratchPostgres::start().unwrap();
        let keys = tempfile::tempdir().unwrap();
        for (name, case) in CASES {
            let url = pg.create_database(name).unwrap();
            let key = keys.path().join(format!("{name}.key"));
            eprintln!("case {name}");
            case(&|| Store::open_postgres(&url, &key).unwrap());
        }
    }
}

#[cfg(test)]
mod retention_tests {
    use super::*;

    #[test]
    fn the_database_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stork.db");
        let _s = Store::open(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    pub(super) fn a_machine_keeps_its_newest_events(open: &dyn Fn() -> Store) {
        let s = open();
        let mac: MacAddr = "52:54:00:00:00:01".parse().unwrap();
        let m = Machine::new("m1".into(), vec![mac], 0);
        let ev = |n: i64| NewEvent {
            at: n,
            actor: "test".into(),
            old_status: None,
            new_status: None,
            message: format!("event {n}"),
        };
        s.create_machine(&m, &ev(0)).unwrap();
        let total = MAX_EVENTS_PER_MACHINE + 3 * RETENTION_CHECK_EVERY;
        for n in 1..total {
            s.add_event("m1", &ev(n)).unwrap();
        }
        let kept = s.events(Some("m1"), 0, u32::MAX).unwrap();
        assert!(kept.len() as i64 <= MAX_EVENTS_PER_MACHINE + RETENTION_CHECK_EVERY);
        assert!(kept.len() as i64 >= MAX_EVENTS_PER_MACHINE);
        // The newest are the ones kept.
        assert_eq!(kept.last().unwrap().message, format!("event {}", total - 1));
    }

    pub(super) fn the_audit_log_keeps_its_newest_entries(open: &dyn Fn() -> Store) {
        let s = open();
        let total = MAX_AUDIT_ENTRIES + 3 * RETENTION_CHECK_EVERY;
        for n in 0..total {
            s.add_audit(&AuditRecord {
                id: 0,
                at: n,
                actor: "anonymous".into(),
                method: "POST".into(),
                path: format!("/api/v1/x/{n}"),
                status: 401,
            })
            .unwrap();
        }
        let kept = s.audit(0, u32::MAX).unwrap();
        assert!(kept.len() as i64 <= MAX_AUDIT_ENTRIES + RETENTION_CHECK_EVERY);
        assert!(kept.len() as i64 >= MAX_AUDIT_ENTRIES);
        assert_eq!(kept.last().unwrap().at, total - 1);
    }
}

#[cfg(test)]
mod space_tests {
    use super::*;

    #[test]
    fn the_free_space_answer_is_kept_for_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("stork.db")).unwrap();
        let ev = NewEvent {
            at: 0,
            actor: "test".into(),
            old_status: None,
            new_status: None,
            message: "created".into(),
        };
        let m = Machine::new("m1".into(), vec!["52:54:00:00:00:03".parse().unwrap()], 0);
        // A fresh "full" answer is believed without asking the disk again...
        *s.space.lock().unwrap() = Some((Instant::now(), Some(0)));
        let e = s.create_machine(&m, &ev).unwrap_err();
        assert!(
            matches!(e, StoreError::DiskFull { free_mib: 0, .. }),
            "{e:?}"
        );
        assert!(matches!(
            s.add_event("m1", &ev),
            Err(StoreError::DiskFull { .. })
        ));
        // ...and an old one is asked again (this disk has room).
        let Some(old) = Instant::now().checked_sub(SPACE_CHECK_EVERY * 2) else {
            return;
        };
        *s.space.lock().unwrap() = Some((old, Some(0)));
        s.create_machine(&m, &ev).unwrap();
        let (at, free) = s.space.lock().unwrap().unwrap();
        assert!(at > old && free.is_some_and(|f| f > 0));
    }

    /// Unmounts the test's small file system however the test ends.
    struct Mounted(std::path::PathBuf);

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    #[test]
    fn a_nearly_full_disk_refuses_new_records_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mounted = nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=32m"),
        );
        if mounted == Err(nix::errno::Errno::EPERM) {
            eprintln!("skipped: mounting a small tmpfs needs root");
            return;
        }
        mounted.unwrap();
        let _mounted = Mounted(dir.path().to_path_buf());
        let s = Store::open(&dir.path().join("stork.db")).unwrap();
        let mac: MacAddr = "52:54:00:00:00:02".parse().unwrap();
        let ev = NewEvent {
            at: 0,
            actor: "test".into(),
            old_status: None,
            new_status: None,
            message: "created".into(),
        };
        let e = s
            .create_machine(&Machine::new("m2".into(), vec![mac], 0), &ev)
            .unwrap_err();
        assert!(matches!(e, StoreError::DiskFull { .. }), "{e:?}");
        assert!(e.to_string().contains("nearly full"), "{e}");
        assert!(s.list_machines().unwrap().is_empty());
    }
}

#[cfg(test)]
mod secrets_tests {
    use std::os::unix::fs::PermissionsExt;

    use serde_json::json;

    use super::*;

    const IPMI_PW: &str = "ipmi-Hunter2-pw";
    const REDFISH_PW: &str = "redfish-Hunter3-pw";

    fn ev() -> NewEvent {
        NewEvent {
            at: 0,
            actor: "test".into(),
            old_status: None,
            new_status: Some(Status::New),
            message: "created".into(),
        }
    }

    fn power(driver: &str, params: serde_json::Value) -> PowerConfig {
        PowerConfig {
            driver: driver.into(),
            params: params.as_object().unwrap().clone(),
        }
    }

    fn ipmi(pw: &str) -> PowerConfig {
        power(
            "ipmi",
            json!({"host": "10.0.0.5", "username": "admin", "password": pw}),
        )
    }

    fn redfish(pw: &str) -> PowerConfig {
        power(
            "redfish",
            json!({"url": "https://10.0.0.6", "username": "root", "password": pw}),
        )
    }

    fn add(s: &Store, id: &str, n: u8, p: PowerConfig) -> Machine {
        let mac = MacAddr([0x52, 0x54, 0, 0, 0, n]);
        let mut m = Machine::new(id.into(), vec![mac], 0);
        m.power = p;
        s.create_machine(&m, &ev()).unwrap()
    }

    /// The database file and its write-ahead log, as raw bytes.
    fn raw(db: &Path) -> Vec<u8> {
        let mut bytes = std::fs::read(db).unwrap();
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        bytes.extend(std::fs::read(std::path::PathBuf::from(wal)).unwrap_or_default());
        bytes
    }

    fn holds(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// The `password` as the database holds it.
    fn stored_password(db: &Path, id: &str) -> String {
        let conn = Connection::open(db).unwrap();
        let power: String = conn
            .query_row("SELECT power FROM machines WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap();
        let p: PowerConfig = serde_json::from_str(&power).unwrap();
        p.params["password"].as_str().unwrap().to_string()
    }

    #[test]
    fn bmc_passwords_are_encrypted_at_rest_and_read_back_in_clear() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("stork.db");
        let s = Store::open(&db).unwrap();
        let a = add(&s, "a", 1, ipmi(IPMI_PW));
        let b = add(&s, "b", 2, redfish(REDFISH_PW));
        assert_eq!(a.power, ipmi(IPMI_PW));
        assert_eq!(b.power, redfish(REDFISH_PW));
        // A save writes it sealed again (a new password too).
        let mut b2 = b.clone();
        b2.power = redfish(&format!("{REDFISH_PW}-new"));
        s.save_machine(&b2, &[]).unwrap();
        assert_eq!(
            s.get_machine("b").unwrap().power,
            redfish(&format!("{REDFISH_PW}-new"))
        );
        let listed: Vec<PowerConfig> = s
            .list_machines()
            .unwrap()
            .into_iter()
            .map(|m| m.power)
            .collect();
        assert_eq!(listed[0], ipmi(IPMI_PW));
        let bytes = raw(&db);
        for pw in [IPMI_PW, REDFISH_PW] {
            assert!(!holds(&bytes, pw), "{pw} is in the database file");
        }
        assert!(stored_password(&db, "a").starts_with(secrets::SEALED_PREFIX));
        // The rest of the params are as they were.
        assert!(holds(&bytes, "10.0.0.5"));
        // Both files are the owner's alone, and the key is its own file.
        let key = dir.path().join(secrets::KEY_FILE_NAME);
        assert_eq!((mode(&db), mode(&key)), (0o600, 0o600));
        assert!(!holds(
            &bytes,
            std::fs::read_to_string(&key).unwrap().trim()
        ));
        // Reopened with the same key file: the same passwords.
        drop(s);
        let s = Store::open(&db).unwrap();
        assert_eq!(s.get_machine("a").unwrap().power, ipmi(IPMI_PW));
        assert_eq!((mode(&db), mode(&key)), (0o600, 0o600));
    }

    #[test]
    fn the_key_file_may_live_elsewhere() {
        let data = tempfile::tempdir().unwrap();
        let other_disk = tempfile::tempdir().unwrap();
        let db = data.path().join("stork.db");
        let key = other_disk.path().join("stork.key");
        let s = Store::open_with_key(&db, &key).unwrap();
        add(&s, "a", 1, ipmi(IPMI_PW));
        drop(s);
        assert_eq!(mode(&key), 0o600);
        assert!(!data.path().join(secrets::KEY_FILE_NAME).exists());
        let s = Store::open_with_key(&db, &key).unwrap();
        assert_eq!(s.get_machine("a").unwrap().power, ipmi(IPMI_PW));
        drop(s);
        // Without its key file the database is refused, with the file named.
        let e = Store::open_with_key(&db, &data.path().join("nope.key")).unwrap_err();
        assert!(
            matches!(e, StoreError::Secrets(SecretsError::KeyMissing { .. })),
            "{e:?}"
        );
        assert!(e.to_string().contains("nope.key"), "{e}");
        assert!(!data.path().join("nope.key").exists());
    }

    #[test]
    fn a_missing_or_wrong_key_is_a_clear_error_not_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("stork.db");
        let key = dir.path().join(secrets::KEY_FILE_NAME);
        add(&Store::open(&db).unwrap(), "a", 1, ipmi(IPMI_PW));
        let good = std::fs::read(&key).unwrap();

        std::fs::remove_file(&key).unwrap();
        let e = Store::open(&db).unwrap_err();
        assert!(
            matches!(e, StoreError::Secrets(SecretsError::KeyMissing { .. })),
            "{e:?}"
        );
        assert!(e.to_string().contains(&key.display().to_string()), "{e}");
        // No new key was made in its place.
        assert!(!key.exists());

        // Another key: refused at open, naming the file and the machine.
        drop(SecretKey::create(&key).unwrap());
        let e = Store::open(&db).unwrap_err();
        assert!(
            matches!(e, StoreError::Secrets(SecretsError::WrongKey { .. })),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.contains(&key.display().to_string()) && text.contains("machine a"),
            "{text}"
        );
        assert!(!text.contains(IPMI_PW));

        std::fs::write(&key, &good).unwrap();
        let s = Store::open(&db).unwrap();
        assert_eq!(s.get_machine("a").unwrap().power, ipmi(IPMI_PW));
        // Machines without a secret need no key at all.
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("stork.db");
        let s = Store::open(&db).unwrap();
        add(&s, "m", 1, PowerConfig::manual());
        drop(s);
        std::fs::remove_file(dir.path().join(secrets::KEY_FILE_NAME)).unwrap();
        Store::open(&db).unwrap();
    }

    #[test]
    fn clear_passwords_of_an_older_version_are_encrypted_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("stork.db");
        let s = Store::open(&db).unwrap();
        let a = add(&s, "a", 1, PowerConfig::manual());
        add(&s, "b", 2, PowerConfig::manual());
        drop(s);
        // The rows as an older version wrote them: clear passwords, in the log and the file.
        let conn = Connection::open(&db).unwrap();
        for (id, p) in [("a", ipmi(IPMI_PW)), ("b", redfish(REDFISH_PW))] {
            conn.execute(
                "UPDATE machines SET power = ?2 WHERE id = ?1",
                rusqlite::params![id, json(&p)],
            )
            .unwrap();
        }
        drop(conn);
        let conn = Connection::open(&db).unwrap();
        conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
        drop(conn);
        assert!(holds(&raw(&db), IPMI_PW) && holds(&raw(&db), REDFISH_PW));

        let s = Store::open(&db).unwrap();
        let got = s.get_machine("a").unwrap();
        assert_eq!(got.power, ipmi(IPMI_PW));
        // Not a change of the machine: its version stays.
        assert_eq!(got.version, a.version);
        assert_eq!(s.get_machine("b").unwrap().power, redfish(REDFISH_PW));
        let bytes = raw(&db);
        for pw in [IPMI_PW, REDFISH_PW] {
            assert!(!holds(&bytes, pw), "{pw} is still in the database file");
        }
        drop(s);
        assert!(stored_password(&db, "b").starts_with(secrets::SEALED_PREFIX));
        // Once: the next open only checks.
        let sealed = stored_password(&db, "a");
        drop(Store::open(&db).unwrap());
        assert_eq!(stored_password(&db, "a"), sealed);
    }

    #[test]
    fn api_views_never_carry_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("stork.db")).unwrap();
        let m = add(&s, "a", 1, ipmi(IPMI_PW));
        let shown = serde_json::to_string(&m.redacted()).unwrap();
        assert!(!shown.contains(IPMI_PW), "{shown}");
        let params = crate::lifecycle::controller::power_params(&m).unwrap();
        let view = params.api_view().to_string();
        assert!(
            !view.contains(IPMI_PW) && view.contains("\"password_set\":true"),
            "{view}"
        );
    }
}

#[cfg(test)]
mod agent_token_tests {
    use super::*;

    /// Every agent request looks its machine up by its token's hash: by an index, not a scan
    /// of every machine (each wrong token a hostile host sends would cost one).
    pub(super) fn a_token_is_found_through_its_index(open: &dyn Fn() -> Store) {
        let s = open();
        let ev = tests::ev("created");
        for (n, hash) in [(1u8, Some("hash1")), (2, Some("hash2")), (3, None)] {
            let mac = MacAddr([0x52, 0x54, 0, 0, 0, n]);
            let mut m = Machine::new(format!("t{n}"), vec![mac], 0);
            m.agent.token_hash = hash.map(str::to_string);
            s.create_machine(&m, &ev).unwrap();
        }
        let found = s.machine_by_agent_token("hash2").unwrap().unwrap();
        assert_eq!((found.id.as_str(), found.macs.len()), ("t2", 1));
        assert!(s.machine_by_agent_token("wrong").unwrap().is_none());

        let plan = tests::query_plan(
            &s,
            &Store::machines_sql("WHERE agent_token = ?1"),
            &args!["hash2"],
        );
        assert!(plan.contains("machines_by_agent_token"), "{plan}");
    }

    pub(super) fn a_save_that_read_the_machine_before_the_token_was_used_cannot_undo_it(
        open: &dyn Fn() -> Store,
    ) {
        let s = open();
        let mac: MacAddr = "52:54:00:00:00:07".parse().unwrap();
        let ip: IpAddr = "10.77.0.50".parse().unwrap();
        let token = |hash: &str| AgentIdentity {
            token_hash: Some(hash.into()),
            ip: Some(ip),
            used: false,
        };
        let mut m = Machine::new("t1".into(), vec![mac], 0);
        m.agent = token("hash1");
        let ev = NewEvent {
            at: 0,
            actor: "test".into(),
            old_status: None,
            new_status: Some(Status::New),
            message: "created".into(),
        };
        let before = s.create_machine(&m, &ev).unwrap();
        // Writers read the machine, then the agent's first request marks its token used.
        let stale = before.clone();
        assert!(s.mark_agent_token_used("hash1").unwrap());
        let used = s.get_machine("t1").unwrap();
        assert!(used.agent.used);
        // Not a version change: no writer fails because the agent called.
        assert_eq!(used.version, before.version);
        // A save of the same token keeps the mark...
        let mut change = stale.clone();
        change.hostname = Some("renamed".into());
        let saved = s.save_machine(&change, &[]).unwrap();
        assert!(saved.agent.used && saved.hostname.as_deref() == Some("renamed"));
        // ...a successor token from a read made before the use is refused...
        let mut successor = saved.clone();
        successor.agent = token("hash2");
        assert!(matches!(
            s.save_machine(&successor, &[]),
            Err(StoreError::Conflict { .. })
        ));
        let now = s.get_machine("t1").unwrap();
        assert_eq!(now.agent.token_hash.as_deref(), Some("hash1"));
        assert!(now.agent.used);
        // ...and clearing the token (a new boot step) still works, as does the next token.
        let mut cleared = now.clone();
        cleared.agent = AgentIdentity::default();
        let cleared = s.save_machine(&cleared, &[]).unwrap();
        assert_eq!(cleared.agent, AgentIdentity::default());
        let mut next = cleared.clone();
        next.agent = token("hash3");
        let next = s.save_machine(&next, &[]).unwrap();
        assert!(!next.agent.used);
        // Later uses change nothing.
        assert!(s.mark_agent_token_used("hash3").unwrap());
        assert!(!s.mark_agent_token_used("hash3").unwrap());
        assert!(!s.mark_agent_token_used("hash1").unwrap());
        assert_eq!(s.get_machine("t1").unwrap().version, next.version);
    }
}
