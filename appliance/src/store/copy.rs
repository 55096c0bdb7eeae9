//! Copies one store's records into another, empty one: `stork db migrate` moves an
//! appliance from SQLite to PostgreSQL (or back) with nothing lost.
//!
//! A table-by-table copy of the stored rows, not of the records read through the API: BMC
//! passwords stay sealed (the target is opened with the same key file), token hashes and
//! event and audit ids are kept, so event streams resumed after the move and tokens in
//! clients' hands work as before.

use super::sql::{Dialect, Sql, Value};
use super::{Store, StoreError};

/// Each table and its columns, parents before children (interfaces and events refer to
/// machines). Every column of the schema (SQLite V11, PostgreSQL V3) is here; a migration
/// that adds one adds it here too (a test compares this list with the schema).
pub(crate) const TABLES: &[(&str, &str)] = &[
    (
        "machines",
        "id, hostname, status, status_message, status_since, version, boot_mac, arch, power, \
         inventory, owner, deploy, tags, agent_token, created_at, updated_at, netboot, \
         erase_quick, last_heartbeat, heartbeat_step, heartbeat_deadline, agent_ip, \
         agent_token_used, power_state, power_seen_at, hw_cpus, hw_memory_bytes, hw_disks, \
         hw_disk_bytes, site, commission_tests, default_layout, min_kernel, signed_boot",
    ),
    ("interfaces", "mac, machine_id"),
    (
        "events",
        "id, machine_id, at, actor, old_status, new_status, message",
    ),
    (
        "tokens",
        "hash, id, description, created_at, scope, expires_at, revoked_at",
    ),
    ("ssh_keys", "id, name, key, created_at"),
    ("boot_resources", "name, body, created_at"),
    ("audit", "id, at, actor, method, path, status"),
    (
        "power_requests",
        "id, site, machine_id, action, requested_at, requested_by",
    ),
    ("dhcp_leases", "site, ip, mac, expires, kind"),
    ("static_addresses", "site, ip, machine_id"),
    ("scripts", "name, body, created_at"),
    ("script_results", "machine_id, name, body, at"),
    ("layouts", "name, body, created_at"),
];

/// Tables whose `id` the database numbers: the copy keeps the source's ids, and the
/// target's numbering continues after them.
const NUMBERED: &[&str] = &["events", "audit", "power_requests"];

/// Rows copied, by table, in `TABLES`' order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyReport {
    pub rows: Vec<(&'static str, u64)>,
}

/// Rows read and written per statement round: bounded memory whatever the store's size.
const BATCH: i64 = 1000;

impl Store {
    /// Copies every record of this store into `target`, which must hold none, in one
    /// transaction of the target's: a copy that fails leaves it empty.
    pub fn copy_into(&self, target: &Store) -> Result<CopyReport, StoreError> {
        let (machines, tokens): (i64, i64) = target.run(|db| {
            let row = db.query_one(
                "SELECT (SELECT COUNT(*) FROM machines), (SELECT COUNT(*) FROM tokens)",
                &[],
            )?;
            Ok((row.get(0)?, row.get(1)?))
        })?;
        if machines > 0 || tokens > 0 {
            return Err(StoreError::NotEmpty { machines, tokens });
        }
        target.transaction(|to| {
            let mut report = CopyReport { rows: Vec::new() };
            for (table, columns) in TABLES {
                let n = self.copy_table(table, columns, to)?;
                report.rows.push((table, n));
            }
            if to.dialect() == Dialect::Postgres {
                for table in NUMBERED {
                    // The next id PostgreSQL hands out follows the copied ones.
                    to.query(
                        &format!(
                            "SELECT setval(pg_get_serial_sequence('{table}', 'id'), \
                             COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
                        ),
                        &[],
                    )?;
                }
            }
            Ok(report)
        })
    }

    /// Copies `table` in batches, in its insertion order (`rowid`: interfaces keep their
    /// order, events and audit entries their ids).
    fn copy_table(&self, table: &str, columns: &str, to: &mut dyn Sql) -> Result<u64, StoreError> {
        let width = columns.split(',').count();
        // Interfaces in the order they were added (the dialect's insertion order); on
        // PostgreSQL the other tables' order does not matter (ids are copied as they are).
        let order = match self.dialect() {
            d if table == "interfaces" => d.insertion_order(),
            Dialect::Sqlite => "rowid",
            // Batches are pages: the order must be total.
            Dialect::Postgres if table == "dhcp_leases" => "site, ip",
            Dialect::Postgres => "1",
        };
        let overriding = match to.dialect() {
            Dialect::Postgres if NUMBERED.contains(&table) => " OVERRIDING SYSTEM VALUE",
            _ => "",
        };
        let placeholders: Vec<String> = (1..=width).map(|i| format!("?{i}")).collect();
        let insert = format!(
            "INSERT INTO {table} ({columns}){overriding} VALUES ({})",
            placeholders.join(", ")
        );
        let mut copied = 0u64;
        let mut offset = 0i64;
        loop {
            let rows = self.run(|from| {
                Ok(from.query(
                    &format!("SELECT {columns} FROM {table} ORDER BY {order} LIMIT ?1 OFFSET ?2"),
                    &super::sql::args![BATCH, offset],
                )?)
            })?;
            for row in &rows {
                let values: Vec<Value> = (0..width).map(|i| row.value(i)).collect();
                to.execute(&insert, &values)?;
            }
            copied += rows.len() as u64;
            offset += BATCH;
            if (rows.len() as i64) < BATCH {
                return Ok(copied);
            }
        }
    }
}

/// The columns `table` has in the schema, in order (PostgreSQL's `seq` is SQLite's rowid,
/// which no column list names).
#[cfg(test)]
pub(crate) fn schema_columns(db: &mut dyn Sql, table: &str) -> Result<Vec<String>, StoreError> {
    let sql = match db.dialect() {
        Dialect::Sqlite => "SELECT name FROM pragma_table_info(?1) ORDER BY cid",
        Dialect::Postgres => {
            "SELECT column_name FROM information_schema.columns \
             WHERE table_name = ?1 AND table_schema = current_schema() ORDER BY ordinal_position"
        }
    };
    let mut names = Vec::new();
    for row in db.query(sql, &super::sql::args![table])? {
        let name: String = row.get(0)?;
        if name != "seq" {
            names.push(name);
        }
    }
    Ok(names)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Every column of every table is copied, on either backend.
    pub(crate) fn the_copy_names_every_column(s: &Store) {
        for (table, columns) in TABLES {
            let mut listed: Vec<String> =
                columns.split(',').map(|c| c.trim().to_string()).collect();
            let mut schema = s.run(|db| schema_columns(db, table)).unwrap();
            listed.sort();
            schema.sort();
            assert_eq!(listed, schema, "columns of {table}");
        }
    }

    #[test]
    fn the_copy_names_every_column_of_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        the_copy_names_every_column(&Store::open(&dir.path().join("stork.db")).unwrap());
    }
}
