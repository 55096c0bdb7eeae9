//! Schema migrations: the SQL files in `appliance/migrations/` (`V{n}__{what}.sql`, applied in
//! version order), embedded at build time and run by refinery, which records each applied
//! migration (version, name, checksum) in its history table `refinery_schema_history`.
//! refinery drives PostgreSQL too (its `tokio-postgres` feature), so a PostgreSQL backend
//! reuses this runner and its history format.
//!
//! An applied migration file is never edited: refinery refuses to start on a database whose
//! history has a different checksum for a version (divergent) or a version no file has.
//!
//! refinery's own rusqlite driver pins rusqlite <= 0.41, so [`Sqlite`] is that driver on our
//! rusqlite, working inside one open transaction: an open's baseline, pending migrations,
//! their history rows and `user_version` commit together or not at all.
//!
//! Databases from before refinery kept their schema version in `PRAGMA user_version` only
//! (migration `n` set it to `n`). With no history rows and `user_version = N > 0`, the first
//! `N` migrations are recorded as applied without running them (refinery's fake target), and
//! the rest run as usual. `user_version` still follows the newest applied version, so a
//! binary from before refinery opening a newer database sees it as migrated.

use refinery::{Migration, Runner, SchemaVersion, Target};
use refinery_core::traits::sync::{Migrate, Query, Transaction};
use rusqlite::types::Type;
use rusqlite::{Connection, TransactionBehavior};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// PostgreSQL's migrations: a baseline equal to SQLite's schema at V9, then pairs.
mod embedded_postgres {
    refinery::embed_migrations!("migrations-postgres");
}

/// The advisory lock key appliances sharing a PostgreSQL database migrate under, one at a
/// time ("stork" in ASCII).
const PG_MIGRATION_LOCK: i64 = 0x73746f726b;

/// refinery's history table (its default name, spelled out as the baseline reads it).
pub(crate) const HISTORY_TABLE: &str = "refinery_schema_history";

/// The embedded migrations, pending ones applied in one transaction.
pub(crate) fn runner() -> Runner {
    let mut runner = embedded::migrations::runner().set_grouped(true);
    runner.set_migration_table_name(HISTORY_TABLE);
    runner
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("database error")]
    Db(#[from] rusqlite::Error),
    #[error("schema migration failed: {0}")]
    Runner(#[from] refinery::Error),
    #[error("PostgreSQL")]
    Postgres(#[from] postgres::Error),
}

/// Brings a PostgreSQL schema up to date, under an advisory lock: appliances started
/// together migrate one after the other, and the later ones find nothing to do. A database
/// migrated by a newer Stork (a version this binary has no file for) is refused by refinery
/// with a message naming that version.
pub(crate) fn migrate_postgres(client: &mut postgres::Client) -> Result<(), MigrateError> {
    client.execute("SELECT pg_advisory_lock($1)", &[&PG_MIGRATION_LOCK])?;
    let mut runner = embedded_postgres::migrations::runner().set_grouped(true);
    runner.set_migration_table_name(HISTORY_TABLE);
    let report = runner.run(client);
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&PG_MIGRATION_LOCK]);
    for m in report?.applied_migrations() {
        tracing::info!(migration = %m, "applied PostgreSQL schema migration");
    }
    unlocked?;
    Ok(())
}

/// PostgreSQL's migrations up to `version` only: a database as an older Stork left it.
#[cfg(test)]
pub(crate) fn migrate_postgres_to(client: &mut postgres::Client, version: SchemaVersion) {
    let mut runner = embedded_postgres::migrations::runner()
        .set_grouped(true)
        .set_target(Target::Version(version));
    runner.set_migration_table_name(HISTORY_TABLE);
    runner.run(client).expect("PostgreSQL migrations");
}

/// Machines as a database before `signed_boot` (SQLite V16, PostgreSQL V8) holds them: one
/// tagged, one whose inventory saw Secure Boot on (and holds a `\u0000`, which PostgreSQL's
/// `jsonb` refuses), one with it off (its vendor string and a tag spell the key and the
/// tag), one with neither (and a `\u0000` in its tag).
#[cfg(test)]
pub(crate) const BEFORE_SIGNED_BOOT: &[&str] = &[
    "INSERT INTO machines (id, status, status_since, version, arch, power, tags, inventory, \
     created_at, updated_at) VALUES \
     ('t', 'ready', 1, 1, 'x86_64', '{\"driver\":\"manual\",\"params\":{}}', '[\"secure-boot\"]', NULL, 1, 1), \
     ('i', 'ready', 1, 1, 'x86_64', '{\"driver\":\"manual\",\"params\":{}}', '[]', \
      '{\"dmi\":{\"sys_vendor\":\"a\\u0000b\"},\"secure_boot\":true}', 1, 1), \
     ('o', 'ready', 1, 1, 'x86_64', '{\"driver\":\"manual\",\"params\":{}}', '[\"rack\",\"x\\\"secure-boot\"]', \
      '{\"dmi\":{\"sys_vendor\":\"\\\"secure_boot\\\":true\"},\"secure_boot\":false}', 1, 1), \
     ('n', 'ready', 1, 1, 'x86_64', '{\"driver\":\"manual\",\"params\":{}}', '[\"a\\u0000b\"]', NULL, 1, 1)",
    "INSERT INTO interfaces (mac, machine_id) VALUES ('52:54:00:00:03:01', 't'), \
     ('52:54:00:00:03:02', 'i'), ('52:54:00:00:03:03', 'o'), ('52:54:00:00:03:04', 'n')",
];

/// Of [`BEFORE_SIGNED_BOOT`]'s machines, the MACs that boot the signed chain.
#[cfg(test)]
pub(crate) const SIGNED_BEFORE: [&str; 2] = ["52:54:00:00:03:01", "52:54:00:00:03:02"];

/// Brings the schema up to date: baseline of a pre-refinery database, then the pending
/// migrations, in one immediate (write-locked) transaction.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), MigrateError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let user_version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let mut db = Sqlite(&tx);
    let has_history: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
        [HISTORY_TABLE],
        |r| r.get(0),
    )?;
    // An empty table counts as absent: nothing but a baseline or a migration writes to it.
    let recorded = has_history && runner().get_last_applied_migration(&mut db)?.is_some();
    if !recorded && user_version > 0 {
        let baseline = SchemaVersion::try_from(user_version).unwrap_or(SchemaVersion::MAX);
        // Records versions 1..=baseline in the history without running them.
        runner()
            .set_target(Target::FakeVersion(baseline))
            .run(&mut db)?;
        tracing::info!(
            user_version,
            "schema history started from user_version (migrations recorded, not run)"
        );
    }
    let report = runner().run(&mut db)?;
    for m in report.applied_migrations() {
        tracing::info!(migration = %m, "applied schema migration");
    }
    if let Some(last) = runner().get_last_applied_migration(&mut db)? {
        let version = i64::from(last.version());
        if version > user_version {
            tx.pragma_update(None, "user_version", version)?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// refinery's sync driver over an open rusqlite transaction: statements run in it, and its
/// owner commits.
struct Sqlite<'a>(&'a rusqlite::Transaction<'a>);

impl Transaction for Sqlite<'_> {
    type Error = rusqlite::Error;

    fn execute<'a, T: Iterator<Item = &'a str>>(
        &mut self,
        queries: T,
    ) -> Result<usize, Self::Error> {
        let mut count = 0;
        for query in queries {
            self.0.execute_batch(query)?;
            count += 1;
        }
        Ok(count)
    }
}

impl Query<Vec<Migration>> for Sqlite<'_> {
    /// The history rows as refinery writes them: version, name, RFC 3339 time, checksum.
    fn query(&mut self, query: &str) -> Result<Vec<Migration>, Self::Error> {
        let mut stmt = self.0.prepare(query)?;
        let mut rows = stmt.query([])?;
        let mut applied = Vec::new();
        while let Some(row) = rows.next()? {
            let applied_on: String = row.get(2)?;
            let applied_on = OffsetDateTime::parse(&applied_on, &Rfc3339)
                .map_err(|e| rusqlite::Error::FromSqlConversionFailure(2, Type::Text, e.into()))?;
            let checksum: String = row.get(3)?;
            let checksum = checksum
                .parse::<u64>()
                .map_err(|e| rusqlite::Error::FromSqlConversionFailure(3, Type::Text, e.into()))?;
            applied.push(Migration::applied(
                row.get(0)?,
                row.get(1)?,
                applied_on,
                checksum,
            ));
        }
        Ok(applied)
    }
}

impl Migrate for Sqlite<'_> {}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rusqlite::{Connection, params};

    use super::{HISTORY_TABLE, runner};
    use crate::lifecycle::Status;
    use crate::store::Store;

    /// The migrations as the code before refinery held them (`MIGRATIONS` in store/mod.rs),
    /// kept verbatim: databases it made are what the baseline has to accept.
    const OLD_MIGRATIONS: &[&str] = &[
        r#"
CREATE TABLE machines (
    id            TEXT PRIMARY KEY,
    hostname      TEXT,
    status        TEXT NOT NULL,
    status_message TEXT,
    status_since  INTEGER NOT NULL,
    version       INTEGER NOT NULL,
    boot_mac      TEXT,
    arch          TEXT NOT NULL,
    power         TEXT NOT NULL,
    inventory     TEXT,
    owner         TEXT,
    deploy        TEXT,
    tags          TEXT NOT NULL,
    agent_token   TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE TABLE interfaces (
    mac        TEXT PRIMARY KEY,
    machine_id TEXT NOT NULL REFERENCES machines(id) ON DELETE CASCADE
);
CREATE INDEX interfaces_machine ON interfaces(machine_id);
CREATE TABLE events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    machine_id TEXT NOT NULL,
    at         INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    old_status TEXT,
    new_status TEXT,
    message    TEXT NOT NULL
);
CREATE INDEX events_machine ON events(machine_id, id);
CREATE TABLE tokens (
    hash        TEXT PRIMARY KEY,
    id          TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE TABLE ssh_keys (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    key        TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE boot_resources (
    name       TEXT PRIMARY KEY,
    body       TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
"#,
        "ALTER TABLE machines ADD COLUMN netboot INTEGER NOT NULL DEFAULT 1;",
        "ALTER TABLE machines ADD COLUMN erase_quick INTEGER NOT NULL DEFAULT 1;",
        "ALTER TABLE machines ADD COLUMN last_heartbeat INTEGER;
     ALTER TABLE machines ADD COLUMN heartbeat_step TEXT;
     ALTER TABLE machines ADD COLUMN heartbeat_deadline INTEGER;",
    ];

    /// A database as the old `Store::open` left it after its first `n` migrations.
    fn old_database(path: &Path, n: usize) -> Connection {
        let mut conn = Connection::open(path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "synchronous", "FULL").unwrap();
        conn.pragma_update(None, "foreign_keys", "ON").unwrap();
        for (i, sql) in OLD_MIGRATIONS[..n].iter().enumerate() {
            let tx = conn.transaction().unwrap();
            tx.execute_batch(sql).unwrap();
            tx.pragma_update(None, "user_version", i as i64 + 1)
                .unwrap();
            tx.commit().unwrap();
        }
        conn
    }

    /// The schema minus refinery's history table (and its index).
    fn schema(conn: &Connection) -> Vec<(String, String, Option<String>)> {
        let mut stmt = conn
            .prepare(
                "SELECT type, name, sql FROM sqlite_master WHERE tbl_name != ?1 \
                 ORDER BY type, name",
            )
            .unwrap();
        stmt.query_map([HISTORY_TABLE], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn history(conn: &Connection) -> Vec<(i64, String)> {
        let mut stmt = conn
            .prepare(&format!(
                "SELECT version, name FROM {HISTORY_TABLE} ORDER BY version"
            ))
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn user_version(conn: &Connection) -> i64 {
        conn.pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap()
    }

    /// Every embedded migration by version (embedded in file-name order: V10 before V2).
    fn all_versions() -> Vec<(i64, String)> {
        let mut all: Vec<(i64, String)> = runner()
            .get_migrations()
            .iter()
            .map(|m| (i64::from(m.version()), m.name().to_string()))
            .collect();
        all.sort();
        all
    }

    /// The newest migration's version.
    fn latest() -> i64 {
        all_versions().last().map_or(0, |(v, _)| *v)
    }

    #[test]
    fn migration_files_are_the_old_migrations_then_the_new_in_order() {
        let files = all_versions();
        let versions: Vec<i64> = files.iter().map(|(v, _)| *v).collect();
        assert_eq!(versions, (1..=latest()).collect::<Vec<_>>());
        assert!(latest() > OLD_MIGRATIONS.len() as i64);
        assert_eq!(files[0].1, "create_machines_events_tokens_keys_resources");
        assert_eq!(files[3].1, "add_machines_heartbeat");
        assert_eq!(files[4].1, "add_machines_agent_binding");
    }

    #[test]
    fn fresh_database_has_every_migration() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(&dir.path().join("new")).unwrap());
        let new = Connection::open(dir.path().join("new")).unwrap();
        // That it equals an old database migrated on: `old_databases_are_baselined_then_migrated`.
        assert_eq!(history(&new), all_versions());
        assert_eq!(user_version(&new), latest());
        // The pragmas Store::open sets are still set.
        let mode: String = new
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn old_databases_are_baselined_then_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let fresh_path = dir.path().join("fresh");
        drop(Store::open(&fresh_path).unwrap());
        let fresh = schema(&Connection::open(&fresh_path).unwrap());
        for n in 1..=OLD_MIGRATIONS.len() {
            let path = dir.path().join(format!("old{n}"));
            let conn = old_database(&path, n);
            // A row as the first schema holds it (later columns take their defaults).
            conn.execute(
                "INSERT INTO machines (id, hostname, status, status_since, version, arch, \
                 power, tags, created_at, updated_at) \
                 VALUES ('m1', 'old-host', 'ready', 5, 3, 'x86_64', ?1, '[]', 1, 2)",
                params![r#"{"driver":"manual","params":{}}"#],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO interfaces (mac, machine_id) VALUES ('52:54:00:00:00:09', 'm1')",
                [],
            )
            .unwrap();
            drop(conn);

            let s = Store::open(&path).unwrap();
            let m = s.get_machine("52:54:00:00:00:09").unwrap();
            assert_eq!(
                (m.id.as_str(), m.hostname.as_deref(), m.status, m.version),
                ("m1", Some("old-host"), Status::Ready, 3),
                "after {n} old migrations"
            );
            assert!(m.netboot && m.erase_quick && m.last_heartbeat.is_none());
            assert_eq!(m.agent, stork_proto::api::AgentIdentity::default());
            drop(s);

            let conn = Connection::open(&path).unwrap();
            assert_eq!(schema(&conn), fresh, "after {n} old migrations");
            assert_eq!(history(&conn), all_versions(), "after {n} old migrations");
            assert_eq!(user_version(&conn), latest());
            drop(conn);
            // Opening again runs nothing and passes refinery's checksum checks.
            let s = Store::open(&path).unwrap();
            assert_eq!(s.list_machines().unwrap().len(), 1);
        }
    }

    /// Machines stored before the column existed get it from their tags and inventories.
    #[test]
    fn signed_boot_is_filled_in_for_machines_stored_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut conn = Connection::open(&path).unwrap();
        let tx = conn.transaction().unwrap();
        runner()
            .set_target(refinery::Target::Version(15))
            .run(&mut super::Sqlite(&tx))
            .unwrap();
        for sql in super::BEFORE_SIGNED_BOOT {
            tx.execute_batch(sql).unwrap();
        }
        tx.commit().unwrap();
        drop(conn);
        let s = Store::open(&path).unwrap();
        assert_eq!(crate::store::tests::signed_macs(&s), super::SIGNED_BEFORE);
    }

    #[test]
    fn an_empty_history_table_is_no_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let conn = old_database(&path, 2);
        conn.execute_batch(&format!(
            "CREATE TABLE {HISTORY_TABLE} (version int4 PRIMARY KEY, name VARCHAR(255), \
             applied_on VARCHAR(255), checksum VARCHAR(255));"
        ))
        .unwrap();
        drop(conn);
        drop(Store::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        assert_eq!(history(&conn), all_versions());
        assert_eq!(user_version(&conn), latest());
    }

    #[test]
    fn an_edited_applied_migration_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        drop(Store::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.execute(
            &format!("UPDATE {HISTORY_TABLE} SET checksum = '1' WHERE version = 2"),
            [],
        )
        .unwrap();
        drop(conn);
        assert!(Store::open(&path).is_err());
    }
}
