//! Durable state: machines, their event history, tokens, SSH keys and boot resources.
//!
//! SQLite (bundled) in WAL mode with `synchronous = FULL`: a change is acknowledged only
//! after its transaction is on disk, so nothing acknowledged is lost to `kill -9` or power
//! loss. Schema changes are the numbered SQL files in `appliance/migrations/`, run by refinery
//! (see [`migrate`]), which a PostgreSQL backend would reuse.
//!
//! The methods take `&self` and lock one connection; callers in async code run them on the
//! blocking pool (`Store::call`), so no transaction is ever held across an `.await`. A
//! PostgreSQL backend for several appliances would implement the same methods.

mod migrate;
pub mod model;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, Row, params};
use stork_proto::MacAddr;
use stork_proto::api::{AgentIdentity, AuditRecord, TokenScope};

pub use model::*;

use crate::lifecycle::Status;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Db(#[from] rusqlite::Error),
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
}

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    /// Where the database lives: new records are refused when its file system runs low.
    dir: Arc<std::path::PathBuf>,
}

/// New machines and appended events are refused while the database's file system has less
/// than this free: what is left goes to the status changes under way and the DHCP lease
/// journal, which share the data directory.
pub const MIN_FREE_BYTES: u64 = 64 << 20;

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

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
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
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let store = Self {
            conn: Arc::new(Mutex::new(conn)),
            dir: Arc::new(dir),
        };
        store.migrate()?;
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic mid-call leaves SQLite consistent (the transaction rolls back on drop).
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the blocking pool: the async API's way in.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me)).await?
    }

    fn migrate(&self) -> Result<(), StoreError> {
        migrate::migrate(&mut self.lock())?;
        Ok(())
    }

    // ---- machines ----

    const MACHINE_COLUMNS: &'static str = "id, hostname, status, status_message, status_since, \
        version, boot_mac, arch, power, inventory, owner, deploy, tags, agent_token, created_at, updated_at, netboot, erase_quick, \
        last_heartbeat, heartbeat_step, heartbeat_deadline, agent_ip, agent_token_used";

    /// A machine from its row and its interfaces' MACs (any order).
    fn machine_from_row(row: &Row<'_>, mut macs: Vec<MacAddr>) -> Result<Machine, StoreError> {
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
            id,
            hostname: row.get(1)?,
            status: Status::parse(&status).unwrap_or(Status::Broken),
            status_message: row.get(3)?,
            status_since: row.get(4)?,
            version: row.get(5)?,
            boot_mac,
            macs,
            arch: row.get(7)?,
            power: from_json("power", &power)?,
            inventory: inventory.map(|i| from_json("inventory", &i)).transpose()?,
            owner: row.get(10)?,
            deploy: deploy.map(|d| from_json("deploy", &d)).transpose()?,
            tags: from_json("tags", &tags)?,
            agent: AgentIdentity {
                token_hash: row.get(13)?,
                ip: row
                    .get::<_, Option<String>>(21)?
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
        })
    }

    fn query_machines(
        conn: &Connection,
        where_sql: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<Machine>, StoreError> {
        let sql = format!(
            "SELECT {} FROM machines {where_sql} ORDER BY created_at, id",
            Self::MACHINE_COLUMNS
        );
        // Every selected machine's interfaces in one query: one query per machine made
        // listing 10,000 machines several times slower.
        let mut macs: HashMap<String, Vec<MacAddr>> = HashMap::new();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT machine_id, mac FROM interfaces \
             WHERE machine_id IN (SELECT id FROM machines {where_sql}) ORDER BY rowid"
        ))?;
        let mut rows = stmt.query(args)?;
        while let Some(row) = rows.next()? {
            if let Ok(mac) = row.get::<_, String>(1)?.parse() {
                macs.entry(row.get(0)?).or_default().push(mac);
            }
        }
        let mut stmt = conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(args)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let id: String = row.get(0)?;
            let m = macs.remove(&id).unwrap_or_default();
            out.push(Self::machine_from_row(row, m)?);
        }
        Ok(out)
    }

    pub fn list_machines(&self) -> Result<Vec<Machine>, StoreError> {
        Self::query_machines(&self.lock(), "", &[])
    }

    /// Machines in any of `statuses`: the timeout checker's question, answered without
    /// reading (and parsing) every machine.
    pub fn machines_in(&self, statuses: &[Status]) -> Result<Vec<Machine>, StoreError> {
        // Status names are our own fixed identifiers, so they can go into the SQL text.
        let names: Vec<String> = statuses
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        let where_sql = format!("WHERE status IN ({})", names.join(", "));
        Self::query_machines(&self.lock(), &where_sql, &[])
    }

    /// By id, or by any of its MAC addresses.
    pub fn get_machine(&self, key: &str) -> Result<Machine, StoreError> {
        let conn = self.lock();
        let id = match key.parse::<MacAddr>() {
            Ok(mac) => conn
                .query_row(
                    "SELECT machine_id FROM interfaces WHERE mac = ?1",
                    [mac.to_string()],
                    |r| r.get::<_, String>(0),
                )
                .optional()?
                .unwrap_or_else(|| key.to_string()),
            Err(_) => key.to_string(),
        };
        Self::query_machines(&conn, "WHERE id = ?1", &[&id])?
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
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        tx.execute(
            &format!(
                "INSERT INTO machines ({}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19,?20,?21,?22,?23)",
                Self::MACHINE_COLUMNS
            ),
            params![
                m.id,
                m.hostname,
                m.status.as_str(),
                m.status_message,
                m.status_since,
                m.version,
                m.boot_mac.map(|b| b.to_string()),
                m.arch,
                json(&m.power),
                m.inventory.as_ref().map(json),
                m.owner,
                m.deploy.as_ref().map(json),
                json(&m.tags),
                m.agent.token_hash,
                m.created_at,
                m.updated_at,
                m.netboot,
                m.erase_quick,
                m.last_heartbeat,
                m.heartbeat_step,
                m.heartbeat_deadline,
                m.agent.ip.map(|ip| ip.to_string()),
                m.agent.used,
            ],
        )?;
        Self::put_interfaces(&tx, &m.id, &m.macs)?;
        Self::insert_event(&tx, &m.id, event)?;
        tx.commit()?;
        drop(conn);
        self.get_machine(&m.id)
    }

    fn put_interfaces(
        tx: &rusqlite::Transaction<'_>,
        id: &str,
        macs: &[MacAddr],
    ) -> Result<(), StoreError> {
        for mac in macs {
            let owner: Option<String> = tx
                .query_row(
                    "SELECT machine_id FROM interfaces WHERE mac = ?1",
                    [mac.to_string()],
                    |r| r.get(0),
                )
                .optional()?;
            match owner {
                Some(o) if o != id => return Err(StoreError::MacTaken(*mac)),
                Some(_) => {}
                None => {
                    tx.execute(
                        "INSERT INTO interfaces (mac, machine_id) VALUES (?1, ?2)",
                        params![mac.to_string(), id],
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Saves `m` if its stored version is still `m.version`, with `events`, in one
    /// transaction. Returns the saved machine (version + 1).
    ///
    /// The heartbeat columns are written as `m` has them: a heartbeat that landed between the
    /// caller's read and this save (heartbeats do not bump the version) is set back by one
    /// beat, which costs at most one interval of the agent's allowance.
    pub fn save_machine(&self, m: &Machine, events: &[NewEvent]) -> Result<Machine, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let changed = tx.execute(
            "UPDATE machines SET hostname=?2, status=?3, status_message=?4, status_since=?5,
                version=version+1, boot_mac=?6, arch=?7, power=?8, inventory=?9, owner=?10,
                deploy=?11, tags=?12, agent_token=?13, updated_at=?14, netboot=?16, erase_quick=?17,
                last_heartbeat=?18, heartbeat_step=?19, heartbeat_deadline=?20,
                agent_ip=?21, agent_token_used=?22
             WHERE id=?1 AND version=?15",
            params![
                m.id,
                m.hostname,
                m.status.as_str(),
                m.status_message,
                m.status_since,
                m.boot_mac.map(|b| b.to_string()),
                m.arch,
                json(&m.power),
                m.inventory.as_ref().map(json),
                m.owner,
                m.deploy.as_ref().map(json),
                json(&m.tags),
                m.agent.token_hash,
                m.updated_at,
                m.version,
                m.netboot,
                m.erase_quick,
                m.last_heartbeat,
                m.heartbeat_step,
                m.heartbeat_deadline,
                m.agent.ip.map(|ip| ip.to_string()),
                m.agent.used,
            ],
        )?;
        if changed == 0 {
            let exists: bool = tx
                .query_row("SELECT 1 FROM machines WHERE id = ?1", [&m.id], |_| {
                    Ok(true)
                })
                .optional()?
                .unwrap_or(false);
            return Err(if exists {
                StoreError::Conflict {
                    id: m.id.clone(),
                    expected: m.version,
                }
            } else {
                StoreError::NotFound(m.id.clone())
            });
        }
        Self::put_interfaces(&tx, &m.id, &m.macs)?;
        for e in events {
            Self::insert_event(&tx, &m.id, e)?;
        }
        tx.commit()?;
        drop(conn);
        self.get_machine(&m.id)
    }

    pub fn delete_machine(&self, id: &str) -> Result<(), StoreError> {
        let conn = self.lock();
        if conn.execute("DELETE FROM machines WHERE id = ?1", [id])? == 0 {
            return Err(StoreError::NotFound(id.to_string()));
        }
        Ok(())
    }

    /// The machine whose current agent token has this hash.
    pub fn machine_by_agent_token(&self, hash: &str) -> Result<Option<Machine>, StoreError> {
        let conn = self.lock();
        Ok(Self::query_machines(&conn, "WHERE agent_token = ?1", &[&hash])?.pop())
    }

    /// Records an agent's heartbeat on machine `id` if one is still expected there, and
    /// says whether it was. One is expected while the machine is in one of `statuses` and
    /// still network-boots its agent (an installed image ends that), unless the agent of the
    /// current status has already left: it sent heartbeats (`last_heartbeat` is not older
    /// than the status) and then cleared its deadline. `deadline` is when the next beat is
    /// due; `None` says the agent is leaving. Does not bump the version: a heartbeat is not
    /// a change anyone could conflict with.
    /// Marks the agent token with this hash used. Like a heartbeat, no version bump: it
    /// changes nothing a concurrent save of the machine decides on (a save that read the
    /// machine before may write `used` back as false; the next agent request sets it again).
    pub fn mark_agent_token_used(&self, hash: &str) -> Result<(), StoreError> {
        self.lock().execute(
            "UPDATE machines SET agent_token_used = 1 WHERE agent_token = ?1",
            [hash],
        )?;
        Ok(())
    }

    pub fn record_heartbeat(
        &self,
        id: &str,
        statuses: &[Status],
        at: i64,
        step: &str,
        deadline: Option<i64>,
    ) -> Result<bool, StoreError> {
        // Status names are our own fixed identifiers, so they can go into the SQL text.
        let names: Vec<String> = statuses
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        let changed = self.lock().execute(
            &format!(
                "UPDATE machines SET last_heartbeat = ?2, heartbeat_step = ?3, heartbeat_deadline = ?4
                 WHERE id = ?1 AND netboot = 1 AND status IN ({})
                   AND (heartbeat_deadline IS NOT NULL OR last_heartbeat IS NULL
                        OR last_heartbeat < status_since)",
                names.join(", ")
            ),
            params![id, at, step, deadline],
        )?;
        Ok(changed > 0)
    }

    // ---- events ----

    fn insert_event(
        tx: &rusqlite::Transaction<'_>,
        machine_id: &str,
        e: &NewEvent,
    ) -> Result<(), StoreError> {
        tx.execute(
            "INSERT INTO events (machine_id, at, actor, old_status, new_status, message)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                machine_id,
                e.at,
                e.actor,
                e.old_status.map(|s| s.as_str()),
                e.new_status.map(|s| s.as_str()),
                e.message
            ],
        )?;
        // Retention: a machine keeps its newest events only, so that a host sending reports
        // for a known MAC, or a machine in a loop, cannot grow the database without bound.
        let id = tx.last_insert_rowid();
        if id % RETENTION_CHECK_EVERY == 0 {
            tx.execute(
                "DELETE FROM events WHERE machine_id = ?1 AND id < (
                     SELECT id FROM events WHERE machine_id = ?1
                     ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                params![machine_id, MAX_EVENTS_PER_MACHINE - 1],
            )?;
        }
        Ok(())
    }

    /// Refuses new records while the file system is nearly full (see [`MIN_FREE_BYTES`]).
    /// A file system that cannot be asked is let through: the write itself will tell.
    fn check_space(&self) -> Result<(), StoreError> {
        let Ok(st) = nix::sys::statvfs::statvfs(self.dir.as_path()) else {
            return Ok(());
        };
        #[allow(clippy::useless_conversion)] // the field types differ between targets
        let free = u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size()));
        if free < MIN_FREE_BYTES {
            return Err(StoreError::DiskFull {
                dir: self.dir.to_path_buf(),
                free_mib: free >> 20,
                need_mib: MIN_FREE_BYTES >> 20,
            });
        }
        Ok(())
    }

    /// Appends an event without changing the machine (e.g. a rejected agent report).
    pub fn add_event(&self, machine_id: &str, e: &NewEvent) -> Result<(), StoreError> {
        self.check_space()?;
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        Self::insert_event(&tx, machine_id, e)?;
        tx.commit()?;
        Ok(())
    }

    /// Events after `after_id`, oldest first, for one machine or all.
    pub fn events(
        &self,
        machine_id: Option<&str>,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT id, machine_id, at, actor, old_status, new_status, message FROM events
             WHERE id > ?1 AND (?2 IS NULL OR machine_id = ?2) ORDER BY id LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![after_id, machine_id, limit], |r| {
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
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ---- API tokens and the audit log ----

    const TOKEN_COLUMNS: &'static str =
        "id, description, created_at, scope, expires_at, revoked_at";

    fn token_from_row(r: &Row<'_>) -> rusqlite::Result<TokenRecord> {
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
        self.lock().execute(
            "INSERT INTO tokens (hash, id, description, created_at, scope, expires_at, revoked_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                hash,
                t.id,
                t.description,
                t.created_at,
                t.scope.as_str(),
                t.expires_at,
                t.revoked_at
            ],
        )?;
        Ok(())
    }

    pub fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        Ok(self
            .lock()
            .query_row(
                &format!("SELECT {} FROM tokens WHERE hash = ?1", Self::TOKEN_COLUMNS),
                [hash],
                Self::token_from_row,
            )
            .optional()?)
    }

    pub fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {} FROM tokens ORDER BY created_at",
            Self::TOKEN_COLUMNS
        ))?;
        let rows = stmt.query_map([], Self::token_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Revokes the token `id` at `at` (ms); revoking a revoked token keeps the first time.
    pub fn revoke_token(&self, id: &str, at: i64) -> Result<TokenRecord, StoreError> {
        let conn = self.lock();
        let changed = conn.execute(
            "UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
            params![id, at],
        )?;
        if changed == 0 {
            return Err(StoreError::NotFound(id.to_string()));
        }
        Ok(conn.query_row(
            &format!("SELECT {} FROM tokens WHERE id = ?1", Self::TOKEN_COLUMNS),
            [id],
            Self::token_from_row,
        )?)
    }

    pub fn add_audit(&self, a: &AuditRecord) -> Result<(), StoreError> {
        self.lock().execute(
            "INSERT INTO audit (at, actor, method, path, status) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![a.at, a.actor, a.method, a.path, a.status],
        )?;
        Ok(())
    }

    pub fn audit(&self, after: i64, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT id, at, actor, method, path, status FROM audit WHERE id > ?1
             ORDER BY id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit], |r| {
            Ok(AuditRecord {
                id: r.get(0)?,
                at: r.get(1)?,
                actor: r.get(2)?,
                method: r.get(3)?,
                path: r.get(4)?,
                status: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ---- SSH keys and boot resources: small named JSON records ----

    pub fn add_ssh_key(&self, k: &SshKey) -> Result<(), StoreError> {
        self.lock().execute(
            "INSERT INTO ssh_keys (id, name, key, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![k.id, k.name, k.key, k.created_at],
        )?;
        Ok(())
    }

    pub fn ssh_keys(&self) -> Result<Vec<SshKey>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached("SELECT id, name, key, created_at FROM ssh_keys ORDER BY created_at")?;
        let rows = stmt.query_map([], |r| {
            Ok(SshKey {
                id: r.get(0)?,
                name: r.get(1)?,
                key: r.get(2)?,
                created_at: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn delete_ssh_key(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .lock()
            .execute("DELETE FROM ssh_keys WHERE id = ?1", [id])?
            > 0)
    }

    pub fn put_boot_resource(&self, r: &BootResource, now: i64) -> Result<(), StoreError> {
        self.lock().execute(
            "INSERT INTO boot_resources (name, body, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET body = excluded.body",
            params![r.name, json(r), now],
        )?;
        Ok(())
    }

    pub fn boot_resources(&self) -> Result<Vec<BootResource>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached("SELECT body FROM boot_resources ORDER BY name")?;
        let bodies: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        bodies.iter().map(|b| from_json("body", b)).collect()
    }

    pub fn boot_resource(&self, name: &str) -> Result<Option<BootResource>, StoreError> {
        let body: Option<String> = self
            .lock()
            .query_row(
                "SELECT body FROM boot_resources WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        body.map(|b| from_json("body", &b)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(id: &str, mac: &str) -> Machine {
        Machine::new(id.into(), vec![mac.parse().unwrap()], 1000)
    }

    fn ev(msg: &str) -> NewEvent {
        NewEvent {
            at: 1000,
            actor: "test".into(),
            old_status: None,
            new_status: Some(Status::New),
            message: msg.into(),
        }
    }

    #[test]
    fn create_get_save_with_version_check() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
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
        let s = Store::open(&dir.path().join("db")).unwrap();
        assert_eq!(s.get_machine("a1").unwrap().status, Status::Commissioning);
        assert_eq!(s.list_machines().unwrap().len(), 1);
    }

    #[test]
    fn heartbeats_are_recorded_only_while_expected() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
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
mod retention_tests {
    use super::*;

    #[test]
    fn a_machine_keeps_its_newest_events_and_the_database_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stork.db");
        let s = Store::open(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
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
}

#[cfg(test)]
mod space_tests {
    use super::*;

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
